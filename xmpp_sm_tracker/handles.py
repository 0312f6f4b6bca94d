"""An awaitable outcome per message, so an app need not filter the event stream by id.

``handle = await tracker.send_message(to, body)``, then ``await handle.settled()``
(acked, room_received or failed for good) or ``await handle.delivered()`` (a receipt
or a displayed marker). The tracker keeps one handle per message id while the app
holds it (weakly: an unawaited handle costs nothing once dropped), and passes it every
snapshot of its message, so the same handle follows the message through hibernation,
resumption, retries and resends. After a process restart, ``await tracker.handle(id)``
gives a handle for a message a previous process sent.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

from .core.records import TrackedMessage
from .core.states import SETTLED, DeliveryState

__all__ = ["HandleRegistry", "MessageFailed", "MessageHandle", "TrackerClosed"]

_S = DeliveryState
_RECEIPTED = frozenset({_S.DELIVERED, _S.DISPLAYED})


class MessageFailed(Exception):
    """The message failed for good before the awaited outcome (``record`` says why)."""

    def __init__(self, record: TrackedMessage) -> None:
        super().__init__(f"message {record.id} failed: {record.reason}")
        self.record = record


class TrackerClosed(Exception):
    """The tracker ended (plugin removed) before the awaited outcome."""


_Predicate = Callable[[TrackedMessage, bool], bool]


class MessageHandle:
    """One tracked message: its latest snapshot, and awaitable outcomes."""

    __slots__ = ("__weakref__", "_closed", "_final", "_record", "_waiters")

    def __init__(self, record: TrackedMessage, final: bool) -> None:
        self._record = record
        #: True while the record is settled with no automatic retry pending.
        self._final = final
        self._waiters: list[tuple[_Predicate, asyncio.Future[TrackedMessage]]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<MessageHandle {self.id} {self._record.state.value}>"

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def record(self) -> TrackedMessage:
        """The latest snapshot this process has seen."""
        return self._record

    @property
    def state(self) -> DeliveryState:
        return self._record.state

    @property
    def reason(self) -> str | None:
        return self._record.reason

    async def settled(self, timeout: float | None = None) -> TrackedMessage:
        """The outcome as far as the server goes: acked, room_received, a receipt, or
        failed with no automatic retry left. A hand resend starts a new wait."""
        return await self._wait(_is_settled, timeout)

    async def delivered(self, timeout: float | None = None) -> TrackedMessage:
        """Delivered to the peer (a receipt, or a displayed marker that implies one).
        Raises :class:`MessageFailed` if the message fails for good first."""
        return await self._wait(_is_delivered, timeout)

    async def displayed(self, timeout: float | None = None) -> TrackedMessage:
        """Shown to the peer (a displayed marker). Raises :class:`MessageFailed` if the
        message fails for good first."""
        return await self._wait(_is_displayed, timeout)

    async def _wait(self, done: _Predicate, timeout: float | None) -> TrackedMessage:
        if done(self._record, self._final):
            return _outcome(done, self._record, self._final)
        if self._closed:
            raise TrackerClosed(f"the tracker ended before message {self.id} settled")
        future: asyncio.Future[TrackedMessage] = asyncio.get_running_loop().create_future()
        waiter = (done, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _observe(self, record: TrackedMessage, final: bool) -> None:
        self._record, self._final = record, final
        for done, future in list(self._waiters):
            if not future.done() and done(record, final):
                try:
                    future.set_result(_outcome(done, record, final))
                except MessageFailed as failure:
                    future.set_exception(failure)

    def _close(self) -> None:
        self._closed = True
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(TrackerClosed(f"the tracker ended before {self.id} settled"))


def _is_settled(record: TrackedMessage, final: bool) -> bool:
    return final


def _is_delivered(record: TrackedMessage, final: bool) -> bool:
    return record.state in _RECEIPTED or (final and record.state is _S.FAILED)


def _is_displayed(record: TrackedMessage, final: bool) -> bool:
    return record.state is _S.DISPLAYED or (final and record.state is _S.FAILED)


def _outcome(done: _Predicate, record: TrackedMessage, final: bool) -> TrackedMessage:
    """The record a satisfied wait returns; a failure ends a receipt wait with an error."""
    if done is not _is_settled and record.state is _S.FAILED:
        raise MessageFailed(record)
    return record


class HandleRegistry:
    """The tracker's side: one live handle per message id, fed every snapshot."""

    __slots__ = ("_closed", "_handles")

    def __init__(self) -> None:
        self._handles: weakref.WeakValueDictionary[str, MessageHandle] = (
            weakref.WeakValueDictionary()
        )
        self._closed = False

    def __len__(self) -> int:
        return len(self._handles)

    def handle(self, record: TrackedMessage, retry_pending: bool) -> MessageHandle:
        """The handle of ``record``'s message (the live one if the app holds it)."""
        handle = self._handles.get(record.id)
        if handle is None:
            handle = MessageHandle(record, _final(record, retry_pending))
            if self._closed:
                handle._close()
            self._handles[record.id] = handle
        return handle

    def observe(self, record: TrackedMessage, retry_pending: bool) -> None:
        """A new snapshot of a message: its handle (if any) sees it, waiters wake."""
        handle = self._handles.get(record.id)
        if handle is not None:
            handle._observe(record, _final(record, retry_pending))

    def close(self) -> None:
        """The tracker ends: waiters get :class:`TrackerClosed` rather than hang."""
        self._closed = True
        for handle in list(self._handles.values()):
            handle._close()


def _final(record: TrackedMessage, retry_pending: bool) -> bool:
    return record.state in SETTLED and not (record.state is _S.FAILED and retry_pending)
