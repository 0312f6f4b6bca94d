"""``tracker.sm``: the StanzaJS-style ``load`` / ``cache`` hooks for the SM state.

``cache(fn)`` calls ``fn(state)`` (or awaits it) after changes: never two calls at
once, never out of order, one call for a whole burst of changes, and ``fn(None)``
once the session has ended cleanly. Under a steady flow of changes (acks coming in
all the time) calls are at least ``min_interval`` apart, and at least ten times as
long as the last hand-over took (``max_share``): the state holds every unacked stanza,
so a hand-over costs O(in flight), and with 100 000 in flight one every 0.25 s would
leave the event loop no time for anything else. The last call always has the latest
state; session changes (enabled, resumed, ended) go out at once. A failing ``fn`` is
logged and called again with the next change (or after ``retry_delay``; not for
:class:`LeaseLost`, which would fail the same way for ever); it never touches the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .core.smstate import SMStateError, resume_point
from .stores.base import LeaseLost, SMState

__all__ = ["CacheFn", "SMStateError", "SMStateHooks"]

log = logging.getLogger(__name__)

CacheFn = Callable[[SMState | None], Awaitable[None] | None]


class SMStateHooks:
    """Loads a saved state before connect; hands the current one to ``fn`` on change."""

    def __init__(
        self,
        export: Callable[[], SMState | None],
        load: Callable[[object], None],
        retry_delay: float = 1.0,
        min_interval: float = 0.0,
        max_share: float = 0.1,
    ) -> None:
        if not min_interval >= 0:
            raise ValueError(f"min_interval must be >= 0 seconds, not {min_interval!r}")
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], not {max_share!r}")
        self._export = export
        self._load = load
        self.retry_delay = retry_delay
        #: Seconds between two calls while changes keep coming (0: every loop turn).
        self.min_interval = min_interval
        #: The share of time hand-overs may take while changes keep coming: the next
        #: call waits at least the last one's duration divided by it.
        self.max_share = max_share
        self._last_cost = 0.0
        self._fn: CacheFn | None = None
        self._dirty = False
        self._urgent = False
        self._last_call_at: float | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_sent: object = None  # None: there is no saved state to retract
        #: How many times ``fn`` ran, and how many of those raised.
        self.calls = 0
        self.errors = 0
        #: (stream id, handled) of the state last loaded or handed to ``fn`` without an
        #: error: the most a next process can resume with, so the most ``<a h>`` may say.
        self.durable: tuple[str, int] | None = None
        #: Called after ``fn`` took a state (an ``<a/>`` held back may go out now).
        self.on_saved: Callable[[], None] | None = None

    def ackable(self, stream_id: str | None, handled: int) -> int:
        """The ``h`` an ``<a/>`` on a resumable stream may say: with ``fn`` set, no more
        than the state saved last holds, or a next process (after a SIGKILL, or a lease
        lost before this one heard of it) would resume with an ``h`` below what the
        server saw, and the server refuses that: a fresh session, not a resumption."""
        if self._fn is None:
            return handled
        durable = self.durable
        if durable is None or durable[0] != stream_id:
            return 0  # nothing of this stream saved yet (<enabled/> is saved at once)
        return min(handled, durable[1])

    def load(self, state: SMState | None) -> None:
        """Restore a saved state before ``connect()``; None keeps a fresh session.

        Raises :class:`SMStateError` for a corrupt, foreign or unknown state; the
        client then starts a fresh session.
        """
        if state is not None:
            self._load(state)
            self.durable = resume_point(state)

    def cache(self, fn: CacheFn | None) -> None:
        """Call ``fn(state)`` (sync or async) on every change; None stops caching."""
        self._fn = fn
        self._last_sent = None
        if fn is not None:
            self.changed()

    def changed(self, *, urgent: bool = False) -> None:
        """Note a change; cheap, it only schedules one call per burst.

        ``urgent``: a session change, handed over without waiting for ``min_interval``.
        """
        if self._fn is None:
            return
        self._dirty = True
        if urgent:
            self._hurry()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def _hurry(self) -> None:
        self._urgent = True
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._dirty:
                await asyncio.sleep(0)  # let the rest of this burst happen first
                last = self._last_call_at
                spacing = max(self.min_interval, self._last_cost / self.max_share)
                wait = 0.0 if last is None else last + spacing - loop.time()
                if wait > 0 and not self._urgent:
                    self._wake = asyncio.Event()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake = None
                self._dirty = self._urgent = False
                self._last_call_at = start = loop.time()
                await self._call(self._export())
                self._last_cost = loop.time() - start
        finally:
            self._task = None
            self._urgent = False

    async def _call(self, state: SMState | None) -> None:
        fn = self._fn
        if fn is None or (state is None and self._last_sent is None):
            return  # "ended" is said once
        self.calls += 1
        try:
            result: Any = fn(state)
            if inspect.isawaitable(result):
                await result
        except LeaseLost as exc:
            # Another process owns the account: a retry would fail the same way for ever.
            self.errors += 1
            log.error("sm.cache callback: %s; not retried (the account is not ours)", exc)
            return
        except Exception:
            self.errors += 1
            log.exception("sm.cache callback raised; it is called again with the next change")
            asyncio.get_running_loop().call_later(self.retry_delay, self.changed)
            return
        self._last_sent = state
        self.durable = resume_point(state)
        if self.on_saved is not None:
            self.on_saved()

    async def flush(self) -> None:
        """Wait until ``fn`` has seen the latest state (without waiting ``min_interval``)."""
        while self._task is not None or self._dirty:
            self._hurry()
            if self._task is None:
                self._task = asyncio.ensure_future(self._run())
            await asyncio.shield(self._task)
