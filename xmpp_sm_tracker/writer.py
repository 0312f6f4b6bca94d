"""Batched, ordered writes of record snapshots to a store.

Every event carries a fresh snapshot; writing each one on its own would cost a
round trip per change. The writer keeps the newest snapshot per id and writes
them in one ``upsert``: the first change after a quiet spell at the end of its
event-loop turn, later ones at most every ``min_interval`` seconds while changes
keep coming. A store pays per transaction (SQLite writes every page a batch
touched, and ids are random): acks trickling in by tens made one small transaction
each and cost three times as much per record as batches of hundreds. A failed write
keeps the batch and is retried, so a flaky store delays records but never drops them.
"""

from __future__ import annotations

import asyncio
import logging

from .core.records import TrackedMessage
from .stores.base import LeaseLost, StoreError, TrackerStore

__all__ = ["StoreWriter"]

log = logging.getLogger(__name__)


def _described(exc: BaseException) -> str:
    """The error for a log line: its type and message, not its repr, which for a
    UnicodeError quotes the whole text it choked on (a message body)."""
    if isinstance(exc, UnicodeError):
        return f"{type(exc).__name__}: {getattr(exc, 'reason', 'invalid text')}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class StoreWriter:
    """Coalesces snapshots by id and writes them in order, one batch at a time."""

    def __init__(
        self, store: TrackerStore, retry_delay: float = 0.5, min_interval: float = 0.0
    ) -> None:
        if not min_interval >= 0:
            raise ValueError(f"min_interval must be >= 0 seconds, not {min_interval!r}")
        self.store = store
        self.retry_delay = retry_delay
        #: Seconds between the starts of two background writes while changes keep coming.
        self.min_interval = min_interval
        self._pending: dict[str, TrackedMessage] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        #: When the last write started (loop time), and what wakes a paced writer early.
        self._last_write_at = float("-inf")
        self._wake: asyncio.Future[None] | None = None
        self.failures = 0

    @property
    def backlog(self) -> int:
        """Snapshots waiting to be written."""
        return len(self._pending)

    def put(self, record: TrackedMessage) -> None:
        """Queue a snapshot; it replaces any older one of the same record."""
        self._pending[record.id] = record
        if self._task is None and self._retry is None:
            self._task = asyncio.ensure_future(self._background())

    async def _background(self) -> None:
        try:
            await asyncio.sleep(0)  # let the rest of this burst join the batch
            while self._pending:
                await self._pace()
                await self._write_all(once=True)
        except StoreError as exc:
            if isinstance(exc.__cause__, LeaseLost):
                # Another process owns the account and its records now: never retry.
                log.error("%s; not retried (the account is not ours)", exc)
                return
            log.error("%s; retrying in %.1fs", exc, self.retry_delay)
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self.retry_delay, self._retry_now)
        finally:
            self._task = None

    def _retry_now(self) -> None:
        self._retry = None
        if self._pending and self._task is None:
            self._task = asyncio.ensure_future(self._background())

    async def _pace(self) -> None:
        """Wait until ``min_interval`` after the last write started (or a flush)."""
        loop = asyncio.get_running_loop()
        wait = self._last_write_at + self.min_interval - loop.time()
        if wait <= 0:
            return
        wake = self._wake = loop.create_future()
        timer = loop.call_later(wait, _set_done, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    def _now(self) -> None:
        """Neither a retry timer nor a paced write waits any longer (a flush, a close,
        a hand-over)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._wake is not None:
            _set_done(self._wake)

    async def _write_all(self, *, once: bool = False) -> None:
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending, {}
                self._last_write_at = asyncio.get_running_loop().time()
                try:
                    await self.store.upsert(list(batch.values()))
                except Exception as exc:
                    self.failures += 1
                    # Newer snapshots that arrived meanwhile win over the failed batch.
                    batch.update(self._pending)
                    self._pending = batch
                    raise StoreError(
                        f"writing {len(batch)} records to {type(self.store).__name__} failed: "
                        f"{_described(exc)}"
                    ) from exc
                if once:
                    return

    async def flush(self) -> None:
        """Write everything queued so far; raises :class:`StoreError` if the store fails
        (and keeps retrying in the background, so nothing waits for the next change)."""
        self._now()
        try:
            await self._write_all()
        except StoreError as exc:
            if (
                self._retry is None
                and self._task is None
                and not isinstance(exc.__cause__, LeaseLost)
            ):
                loop = asyncio.get_running_loop()
                self._retry = loop.call_later(self.retry_delay, self._retry_now)
            raise

    def take_pending(self) -> list[TrackedMessage]:
        """Hand over what is queued (to another writer) and stop retrying it here."""
        self._now()
        pending, self._pending = list(self._pending.values()), {}
        return pending

    async def aclose_quietly(self) -> None:
        """Stop: wait for a write in progress, keep quiet about its outcome."""
        self._now()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def aclose(self) -> None:
        """Write what is left and stop retrying."""
        try:
            await self.flush()
        finally:
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)

    def close_with_store(self, store: TrackerStore) -> asyncio.Task[None] | None:
        """The tracker ends: write what is queued, then close ``store`` (closing twice
        is harmless). Returns the task doing it; None without a running loop."""

        async def close() -> None:
            try:
                await self.aclose()
            except StoreError as exc:
                log.warning("could not write the last record changes at plugin end: %s", exc)
            finally:
                await store.aclose()

        try:
            return asyncio.get_running_loop().create_task(close())
        except RuntimeError:  # no loop running (the app is shutting down): leave it
            log.warning("plugin ended outside the event loop: %r is left open", store)
            return None


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
