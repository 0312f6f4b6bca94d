"""The in-memory reference store: what every other store must behave like."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..core.records import TrackedMessage
from ..core.states import IN_FLIGHT, DeliveryState
from .base import SMState, StoreError

__all__ = ["MemoryStore"]


class MemoryStore:
    """Records in a dict, insertion-ordered by first sight. Lost with the process."""

    def __init__(self) -> None:
        self._records: dict[str, TrackedMessage] = {}
        self._sm_state: SMState | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("MemoryStore is closed")

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        self._check_open()
        for record in records:
            self._records[record.id] = record

    async def get(self, message_id: str) -> TrackedMessage | None:
        self._check_open()
        return self._records.get(message_id)

    def _sorted(self, records: list[TrackedMessage]) -> list[TrackedMessage]:
        return sorted(records, key=lambda r: (r.created_at, r.seq or 0))

    async def pending(self) -> list[TrackedMessage]:
        self._check_open()
        return self._sorted([r for r in self._records.values() if r.state in IN_FLIGHT])

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        self._check_open()
        return self._sorted(
            [
                r
                for r in self._records.values()
                if r.state is DeliveryState.FAILED
                and (conversation is None or r.conversation == conversation)
            ]
        )

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        self._check_open()
        bare = jid.split("/", 1)[0]
        matching = self._sorted(
            [
                r
                for r in self._records.values()
                if r.conversation == bare and (before is None or r.created_at < before)
            ]
        )
        return matching[-limit:] if limit > 0 else []

    async def delete(self, message_id: str) -> bool:
        self._check_open()
        return self._records.pop(message_id, None) is not None

    async def delete_failed(self, conversation: str | None = None) -> int:
        doomed = [r.id for r in await self.failed(conversation)]
        for message_id in doomed:
            del self._records[message_id]
        return len(doomed)

    async def save_sm_state(self, state: SMState | None) -> None:
        self._check_open()
        self._sm_state = copy.deepcopy(state)

    async def load_sm_state(self) -> SMState | None:
        self._check_open()
        return copy.deepcopy(self._sm_state)

    async def aclose(self) -> None:
        self._closed = True
