"""The store protocol: where records and the SM state live between events and restarts.

Small and async on purpose, so a store for another database is one new file that
passes the shared contract suite (tests/test_store_contract.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from ..core.records import TrackedMessage

__all__ = [
    "AccountLeased",
    "ErrorFn",
    "LeaseLost",
    "LeasedStore",
    "OpenClose",
    "SMState",
    "StoreError",
    "TrackerStore",
    "saved_json",
    "sm_state_of_text",
    "sm_state_text",
]

#: The JSON-safe stream-management state given to ``sm.cache`` and taken by ``sm.load``.
SMState = dict[str, Any]


class StoreError(Exception):
    """A store could not read or write; the message names the store and what failed."""


#: ``error(what, cause)``: the :class:`StoreError` a store raises, naming its file or database.
ErrorFn = Callable[[str, BaseException | None], StoreError]


class AccountLeased(StoreError):
    """Another live process owns this account in a shared store; it is not shared."""


class LeaseLost(StoreError):
    """This process no longer owns the account: another may have taken it over.

    The tracker stops using the account's stream (no reconnect, no resumption) and its
    store refuses every write, so the two never fight over one stream.
    """


@runtime_checkable
class TrackerStore(Protocol):
    """Durable home of tracked-message records and of the SM state."""

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace records by id, all or nothing."""

    async def get(self, message_id: str) -> TrackedMessage | None:
        """One record by id."""

    async def pending(self) -> list[TrackedMessage]:
        """Records still in flight (SENT, HIBERNATED, RESENT), oldest first."""

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """FAILED records, oldest first, optionally for one conversation (bare JID)."""

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        """The newest ``limit`` records to ``jid`` created before ``before``, oldest first."""

    async def delete(self, message_id: str) -> bool:
        """Delete one record; True if it existed."""

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete FAILED records (all, or one conversation's); how many went."""

    async def save_sm_state(self, state: SMState | None) -> None:
        """Keep the SM state (None: the session ended cleanly, forget it)."""

    async def load_sm_state(self) -> SMState | None:
        """The SM state saved last, or None."""

    async def aclose(self) -> None:
        """Release resources; calling it twice is harmless."""


@runtime_checkable
class LeasedStore(Protocol):
    """A store that one process owns at a time (a lease), and can lose."""

    def on_lease_lost(self, listener: Callable[[LeaseLost], None]) -> None:
        """Call ``listener(error)`` when the lease is lost."""


def sm_state_text(state: object, error: ErrorFn) -> str:
    """The SM state (or what a store keeps of it) as compact JSON text; ``error(what,
    cause)`` when it is not JSON-safe."""
    try:
        return json.dumps(state, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise error("the SM state is not JSON-safe", exc) from exc


def saved_json(text: str, error: ErrorFn) -> Any:
    """What :func:`sm_state_text` wrote, parsed; ``error`` when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error("the saved SM state is not valid JSON", exc) from exc


def sm_state_of_text(text: str, error: ErrorFn) -> SMState:
    """A kept SM state back from its text (a fresh dict); ``error`` when it is not one."""
    state = saved_json(text, error)
    if not isinstance(state, dict):
        raise error("the saved SM state is not a JSON object", None)
    return state


class OpenClose:
    """``async with`` for anything with ``open()`` and ``aclose()``: the stores and the
    databases behind them."""

    async def open(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

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
