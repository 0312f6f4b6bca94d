"""Proofs (receipts, markers, bounces, reflections) for records that left memory.

A settled record leaves memory; a late proof for it fetches it from the store. Ids
come from peers, so a flood of proofs for unknown ids must not become a flood of
store queries and tasks: lookups run one at a time, at most ``MAX_PENDING`` wait
(more are dropped, with a warning), and ids the store does not know are
remembered (the last ``MAX_UNKNOWN``) and not asked for again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .core.records import TrackedMessage

__all__ = ["LateProofs"]

log = logging.getLogger(__name__)

MAX_PENDING = 256
MAX_UNKNOWN = 4096

#: What to do with the record once it is back in memory.
Apply = Callable[[TrackedMessage], None]


class LateProofs:
    """One worker that fetches records for late proofs, bounded."""

    def __init__(self, fetch: Callable[[str], Awaitable[TrackedMessage | None]]) -> None:
        self._fetch = fetch
        self._pending: OrderedDict[str, list[Apply]] = OrderedDict()
        self._unknown: OrderedDict[str, None] = OrderedDict()
        self._worker: asyncio.Task[None] | None = None
        self._dropped = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def look_up(self, message_id: str, apply: Apply) -> None:
        """Fetch ``message_id`` (later, in turn) and ``apply`` the proof to it."""
        if message_id in self._unknown:
            return  # asked already: not ours
        waiting = self._pending.get(message_id)
        if waiting is not None:
            waiting.append(apply)
            return
        if len(self._pending) >= MAX_PENDING:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning(
                    "%d proofs for messages not in memory dropped: more than %d wait for "
                    "the store (a flood of receipts or bounces for unknown ids?)",
                    self._dropped,
                    MAX_PENDING,
                )
            return
        self._pending[message_id] = [apply]
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._work())

    async def _work(self) -> None:
        try:
            while self._pending:
                message_id, applies = next(iter(self._pending.items()))
                try:
                    record = await self._fetch(message_id)
                except Exception:
                    log.exception("could not load message %s for a late delivery proof", message_id)
                    record = None
                else:
                    if record is None:
                        self._remember_unknown(message_id)
                self._pending.pop(message_id, None)
                if record is not None:
                    for apply in applies:
                        apply(record)
        finally:
            self._worker = None

    def _remember_unknown(self, message_id: str) -> None:
        self._unknown[message_id] = None
        if len(self._unknown) > MAX_UNKNOWN:
            self._unknown.popitem(last=False)

    def close(self) -> None:
        """Stop the worker; pending lookups are dropped (the plugin is ending)."""
        self._pending.clear()
        if self._worker is not None:
            self._worker.cancel()
