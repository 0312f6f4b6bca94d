"""Opening the SQLite store's file safely: private, ours, alone, at the latest schema.

The file is created 0600 before SQLite touches it; a file that is not a database,
holds another schema or comes from a newer version is refused with a
:class:`~.base.StoreError` naming it, and is never written to; ours is migrated in
one transaction and switched to WAL.

Trust rules (the directory itself is trusted: SQLite opens files by name): the file
and its companions (``-wal``, ``-shm``, ``-journal``, ``.lock``) must not be symbolic
links and must belong to the user running the tracker; loose modes are tightened to
0600 before SQLite opens them. One file serves one store at a time: an exclusive
``flock`` on ``<file>.lock`` is held from open to close, and a second opener, in this
process or another, is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import stat
import sys
import threading
import weakref
from pathlib import Path
from urllib.parse import quote

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


#: Files SQLite keeps next to the database (WAL mode, rollback mode), and our lock.
_COMPANIONS = ("-wal", "-shm", "-journal")
_LOCK_SUFFIX = ".lock"


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it, then let it go (see take_lock)."""
    with contextlib.suppress(OSError):
        if os.path.samestat(os.lstat(path), os.fstat(fd)):  # still ours at the path
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


class DatabaseFile:
    """One store file: opens it safely, and names it in every error."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._release_lock: weakref.finalize[[Path, int], DatabaseFile] | None = None

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", None):
            detail = f" ({exc.sqlite_errorname}: {exc})"
        elif exc is not None:
            detail = f" ({exc})"
        else:
            detail = ""
        return StoreError(f"SQLite store {self.path}: {what}{detail}")

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    async def connect(self) -> aiosqlite.Connection:
        if self.read_only:
            return await self._connect_read_only()
        for suffix in ("", *_COMPANIONS):
            self._check_ours(self._beside(suffix))
        self.take_lock()
        try:
            self._create_private_file()
            try:
                # isolation_level=None: we write BEGIN/COMMIT ourselves, nothing implicit.
                db = await aiosqlite.connect(self.path, isolation_level=None)
            except sqlite3.Error as exc:
                raise self.error("cannot open the database", exc) from exc
            try:
                await self._prepare(db)
                await db.execute("PRAGMA synchronous=NORMAL")
                # A statement that writes 50 rows keeps the pages it changes in a
                # statement journal, which past 64 KiB went to a temporary file: 13 MB
                # of pwrite()s for 5 000 records, measured, more than the WAL itself.
                await db.execute("PRAGMA temp_store=MEMORY")
                # SQLite gives its files the database file's mode; check rather than trust.
                for suffix in _COMPANIONS:
                    self._check_ours(self._beside(suffix))
            except BaseException:
                await db.close()
                raise
        except BaseException:
            self.release()
            raise
        _watch(db, self.path)
        return db

    def release(self) -> None:
        """Let another store open the file (the connection is closed); harmless twice.

        A store collected open, or left open at exit, lets go through the same
        finalizer: at exit it runs after aiosqlite's worker threads are done."""
        if self._release_lock is not None:
            self._release_lock()

    def take_lock(self) -> None:
        """Hold an exclusive ``flock`` on ``<file>.lock`` until :meth:`release`.

        ``flock`` rather than ``fcntl`` locks, on a file of its own: SQLite's own locks
        are ``fcntl`` locks on the database, which any close in the process drops. The
        holder removes the lock file before letting go, so an opener that got the
        lock on a file that is no longer at the path tries again.
        """
        path = self._beside(_LOCK_SUFFIX)
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise self._symlink(path) from None
                raise self.error(f"cannot create the lock file {path.name}", exc) from exc
            try:
                seen = self._trust(path, os.fstat(fd), fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self.error(
                        f"another tracker holds it (its lock file {path.name} is taken, by "
                        "this process or another); one file serves one tracker at a time"
                    ) from None
                except OSError as exc:
                    raise self.error(f"cannot lock {path.name}", exc) from exc
                with contextlib.suppress(FileNotFoundError):
                    now = os.lstat(path)
                    if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
                        self._release_lock = weakref.finalize(self, _unlock, path, fd)
                        return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder before us removed it as we took it: again
        raise self.error(f"cannot take the lock file {path.name}: it keeps being replaced")

    def _symlink(self, path: Path) -> StoreError:
        which = "" if path == self.path else f"{path.name} "
        return self.error(f"{which}is a symbolic link; refusing to follow it (use the real path)")

    def _check_ours(self, path: Path) -> bool:
        """True if ``path`` exists: a regular file of ours, made 0600 (read-only: as is).

        Opened without following a link, so what is checked is what was opened;
        ``O_NONBLOCK`` so that a FIFO does not block the open."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._symlink(path) from None
            raise self.error(f"cannot read {path.name}", exc) from exc
        try:
            self._trust(path, os.fstat(fd), fd)
        finally:
            os.close(fd)
        return True

    def _trust(self, path: Path, info: os.stat_result, fd: int) -> os.stat_result:
        """Refuse what is not a regular file of ours; tighten a loose mode to 0600."""
        which = "" if path == self.path else f"{path.name} "
        if not stat.S_ISREG(info.st_mode):
            raise self.error(f"{which}is not a regular file")
        if self.read_only:
            return info  # reading harms nobody: inspecting another user's file is fine
        me = os.geteuid()
        if info.st_uid != me:
            raise self.error(
                f"{path.name} is not owned by you (owner uid {info.st_uid}, you are uid "
                f"{me}); refusing to use it"
            )
        if info.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                raise self.error(f"cannot make {path.name} private (mode 0600)", exc) from exc
        return info

    def _create_private_file(self) -> None:
        """Create the file 0600 before SQLite does (it would follow the umask).

        No umask dance: the umask is per process, and other threads may be creating
        files meanwhile. ``O_EXCL`` follows no link; an existing file was checked by
        :meth:`_check_ours`, since a failed ``aiosqlite.connect`` leaves its worker
        thread to report to the event loop later.
        """
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            self._check_ours(self.path)  # created by someone meanwhile: check it again
            return
        except OSError as exc:
            raise self.error("cannot create the database file", exc) from exc
        os.close(fd)

    async def _connect_read_only(self) -> aiosqlite.Connection:
        """Open for reading only: nothing created, migrated, switched or locked.

        ``mode=ro`` still creates ``-wal``/``-shm`` for a WAL database that has none (a
        clean close removes them) and cannot remove them again. Without them every
        commit is in the database file itself, so it is read as ``immutable``, which
        creates nothing. (A store opened meanwhile writes into its own WAL; only a
        checkpoint of 1000 pages during the read could be seen half done.)
        """
        if not self._check_ours(self.path):
            raise self.error("does not exist (a read-only store never creates one)")
        for suffix in _COMPANIONS:
            self._check_ours(self._beside(suffix))
        quiet = not any(self._beside(s).exists() for s in ("-wal", "-journal"))
        uri = f"file:{quote(str(self.path.absolute()))}?mode=ro{'&immutable=1' if quiet else ''}"
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise self.error("cannot open the database", exc) from exc
        try:
            version, tables = await self._inspect(db)
            self._refuse_foreign(version, tables)
            if version == 0:
                raise self.error("is empty, not a tracker store yet (left untouched)")
            if version < len(MIGRATIONS):
                raise self.error(
                    f"has schema version {version}, older than the {len(MIGRATIONS)} this "
                    "version reads; open it read-write once to migrate it (left untouched)"
                )
        except BaseException:
            await db.close()
            raise
        _watch(db, self.path)
        return db

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
