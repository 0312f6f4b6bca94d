"""Opening the SQLite store's file safely: private, ours, at the latest schema.

The file is created 0600 before SQLite touches it; a file that is not a database,
holds another schema or comes from a newer version is refused with a
:class:`~.base.StoreError` naming it, and is never written to; ours is migrated in
one transaction and switched to WAL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import sys
import threading
import weakref
from pathlib import Path

import aiosqlite

from .base import StoreError
from .sqlite_schema import MIGRATIONS, TABLES

__all__ = ["DatabaseFile", "forget_connection", "rollback"]

log = logging.getLogger(__name__)

#: Connections open now, with the file each one is for (see _stop_at_exit).
_open: weakref.WeakKeyDictionary[aiosqlite.Connection, Path] = weakref.WeakKeyDictionary()
_guard_lock = threading.Lock()
_guard: threading.Thread | None = None


def _stop_at_exit() -> None:
    """Runs in a daemon thread: once the main thread is done, stop the worker thread
    of every connection still open, so that the interpreter can exit.

    aiosqlite's worker is not a daemon thread: a store nobody closed (a bot killed
    with Ctrl-C, a snippet without ``async with``) would keep the process alive for
    good, since Python joins such threads before it runs any finalizer. What a
    store had batched and not yet written is lost, as with a crash; the file stays
    consistent (each write is its own transaction).
    """
    threading.main_thread().join()
    for db, path in list(_open.items()):
        print(
            f"xmpp_sm_tracker: SQLite store {path} was never closed (use 'async with' or "
            "aclose()); closing it at exit",
            file=sys.stderr,
        )
        db.stop()


def _watch(db: aiosqlite.Connection, path: Path) -> None:
    global _guard
    _open[db] = path
    with _guard_lock:
        if _guard is None:
            _guard = threading.Thread(target=_stop_at_exit, name="sqlite-store-exit", daemon=True)
            _guard.start()


def forget_connection(db: aiosqlite.Connection) -> None:
    """The connection is closed: nothing to stop at exit."""
    _open.pop(db, None)


async def rollback(db: aiosqlite.Connection) -> None:
    """Roll back; a no-op when no transaction is open. If it fails, the error that
    made us roll back matters more."""
    with contextlib.suppress(Exception):
        await db.rollback()


class DatabaseFile:
    """One store file: opens it safely, and names it in every error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", None):
            detail = f" ({exc.sqlite_errorname}: {exc})"
        elif exc is not None:
            detail = f" ({exc})"
        else:
            detail = ""
        return StoreError(f"SQLite store {self.path}: {what}{detail}")

    async def connect(self) -> aiosqlite.Connection:
        self._create_private_file()
        try:
            # isolation_level=None: we write BEGIN/COMMIT ourselves, nothing implicit.
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self.error("cannot open the database", exc) from exc
        try:
            await self._prepare(db)
            await db.execute("PRAGMA synchronous=NORMAL")
            # SQLite gives -wal/-shm the database file's mode; check rather than trust.
            for suffix in ("-wal", "-shm"):
                self._make_private(self.path.with_name(self.path.name + suffix))
        except BaseException:
            await db.close()
            raise
        _watch(db, self.path)
        return db

    def _create_private_file(self) -> None:
        """Create the file 0600 before SQLite does (it would follow the umask).

        No umask dance: the umask is per process, and other threads may be creating
        files meanwhile. An existing file is checked here too, because a failed
        ``aiosqlite.connect`` leaves its worker thread to report to the event loop later.
        """
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            try:
                if not stat.S_ISREG(os.stat(self.path).st_mode):
                    raise self.error("is not a regular file") from None
                os.close(os.open(self.path, os.O_RDONLY))
            except OSError as exc:
                raise self.error("cannot read the database file", exc) from exc
            return
        except OSError as exc:
            raise self.error("cannot create the database file", exc) from exc
        os.close(fd)

    def _make_private(self, path: Path) -> None:
        try:
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except OSError as exc:
            raise self.error(f"cannot make {path.name} private (mode 0600)", exc) from exc

    async def _inspect(self, db: aiosqlite.Connection) -> tuple[int, dict[str, set[str]]]:
        """The file's schema version and its tables with their columns (reads only)."""
        try:
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            async with db.execute(
                "SELECT name, type FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            ) as cursor:
                objects = list(await cursor.fetchall())
            tables: dict[str, set[str]] = {}
            for name, kind in objects:
                if kind != "table":
                    tables.setdefault(f"{kind} {name}", set())
                    continue
                async with db.execute("SELECT name FROM pragma_table_info(?)", (name,)) as cur:
                    tables[name] = {column for (column,) in await cur.fetchall()}
        except sqlite3.Error as exc:
            raise self.error(self._unreadable(exc), exc) from exc
        return version, tables

    @staticmethod
    def _unreadable(exc: sqlite3.Error) -> str:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            return "is not an SQLite database (left untouched)"
        if name.startswith("SQLITE_CORRUPT"):
            return "is corrupt (left untouched)"
        if name.startswith("SQLITE_CANTOPEN"):
            return "cannot be opened (are the file and its directory readable and writable?)"
        return "cannot be read (left untouched)"

    def _refuse_foreign(self, version: int, tables: dict[str, set[str]]) -> None:
        latest = len(MIGRATIONS)
        if version > latest:
            raise self.error(
                f"schema version {version} is newer than the {latest} this version of "
                "xmpp_sm_tracker knows; upgrade it (the file was left untouched)"
            )
        if version == 0 and tables:
            raise self.error(
                f"holds other things ({', '.join(sorted(tables))}), not a tracker store "
                "(left untouched)"
            )
        if version == latest:
            found = {name: frozenset(columns) for name, columns in tables.items()}
            wrong = sorted(name for name, cols in TABLES.items() if found.get(name) != cols)
            if wrong:
                raise self.error(
                    f"says schema version {version} but its {', '.join(wrong)} table(s) are "
                    "not ours (left untouched)"
                )

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        """Refuse foreign files, bring ours to the latest version, switch to WAL."""
        version, tables = await self._inspect(db)
        self._refuse_foreign(version, tables)
        try:
            if version < len(MIGRATIONS):
                await db.execute("PRAGMA journal_mode=WAL")
                await self._migrate(db)
            else:
                async with db.execute("PRAGMA journal_mode") as cursor:
                    row = await cursor.fetchone()
                if row is None or str(row[0]).lower() != "wal":
                    await db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise self.error("cannot prepare the schema", exc) from exc

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Run the missing migrations in one transaction: the file moves whole or not."""
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Under the write lock now: another process may have migrated it meanwhile.
            version, tables = await self._inspect(db)
            self._refuse_foreign(version, tables)
            for step in range(version, len(MIGRATIONS)):
                await MIGRATIONS[step](db)
                # PRAGMA takes no bound parameters; this is our own int, never user data.
                await db.execute(f"PRAGMA user_version = {int(step + 1):d}")
            self._refuse_foreign(*await self._inspect(db))
            await db.commit()
        except BaseException:
            await rollback(db)
            raise
