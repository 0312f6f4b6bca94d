"""sm.cache semantics: ordered, never concurrent, coalesced, None once, errors retried."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest

from xmpp_sm_tracker.smhooks import SMStateHooks
from xmpp_sm_tracker.stores.base import LeaseLost


class Source:
    """A stand-in for the plugin: a state that changes when told to."""

    def __init__(self) -> None:
        self.version = 0
        self.ended = False
        self.loaded: list[object] = []

    def export(self) -> dict[str, Any] | None:
        return None if self.ended else {"version": 1, "n": self.version}

    def load(self, state: object) -> None:
        self.loaded.append(state)


async def settle(hooks: SMStateHooks) -> None:
    await hooks.flush()


async def test_a_burst_of_changes_costs_one_call_with_the_latest_state() -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load)
    seen: list[Any] = []
    hooks.cache(seen.append)
    await settle(hooks)
    for _ in range(1000):
        source.version += 1
        hooks.changed()
    await settle(hooks)
    assert seen[-1] == {"version": 1, "n": 1000}
    assert hooks.calls <= 3


async def test_async_fn_is_never_run_twice_at_once_and_sees_states_in_order() -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load)
    running = 0
    overlap = False
    seen: list[int] = []

    async def slow(state: dict[str, Any] | None) -> None:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        await asyncio.sleep(0.01)
        assert state is not None
        seen.append(state["n"])
        running -= 1

    hooks.cache(slow)
    for _ in range(20):
        source.version += 1
        hooks.changed()
        await asyncio.sleep(0.003)
    await settle(hooks)
    assert not overlap
    assert seen == sorted(seen)
    assert seen[-1] == 20


async def test_end_of_session_is_reported_once_as_none() -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load)
    seen: list[Any] = []
    hooks.cache(seen.append)
    await settle(hooks)
    source.ended = True
    hooks.changed()
    await settle(hooks)
    hooks.changed()
    await settle(hooks)
    assert seen == [{"version": 1, "n": 0}, None]


async def test_registering_before_any_session_does_not_wipe_a_saved_state() -> None:
    source = Source()
    source.ended = True
    hooks = SMStateHooks(source.export, source.load)
    seen: list[Any] = []
    hooks.cache(seen.append)
    await settle(hooks)
    assert seen == []


async def test_a_raising_fn_is_logged_and_called_again(caplog: pytest.LogCaptureFixture) -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load, retry_delay=0.01)
    calls: list[Any] = []

    def flaky(state: dict[str, Any] | None) -> None:
        calls.append(state)
        if len(calls) == 1:
            raise OSError("disk full")

    with caplog.at_level(logging.ERROR):
        hooks.cache(flaky)
        await settle(hooks)
        await asyncio.sleep(0.05)
        await settle(hooks)
    assert "disk full" in caplog.text
    assert hooks.errors == 1
    assert len(calls) == 2 and calls[1] == {"version": 1, "n": 0}


async def test_a_lost_lease_is_not_retried_on_a_timer(caplog: pytest.LogCaptureFixture) -> None:
    """``fn`` is a leased store's save_sm_state and the lease went to another process:
    every retry would fail the same way (a traceback a second, for ever)."""
    source = Source()
    hooks = SMStateHooks(source.export, source.load, retry_delay=0.01)
    calls: list[Any] = []

    def lost(state: dict[str, Any] | None) -> None:
        calls.append(state)
        raise LeaseLost("alice@example.org: another process owns the account now")

    with caplog.at_level(logging.ERROR):
        hooks.cache(lost)
        await settle(hooks)
        await asyncio.sleep(0.1)
    assert len(calls) == 1 and hooks.errors == 1
    assert "another process owns the account" in caplog.text
    source.version += 1
    hooks.changed()  # a later change still calls it (a store attached anew may work)
    await settle(hooks)
    assert len(calls) == 2


async def test_load_none_keeps_a_fresh_session() -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load)
    hooks.load(None)
    hooks.load({"version": 1})
    assert source.loaded == [{"version": 1}]


async def test_a_steady_flow_of_changes_is_handed_over_at_most_every_min_interval() -> None:
    # Acks arriving all the time would otherwise cost one call (one full export of
    # the unacked queue) per event-loop turn.
    source = Source()
    hooks = SMStateHooks(source.export, source.load, min_interval=0.1)
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    times: list[float] = []

    def record(state: Any) -> None:
        seen.append(state)
        times.append(loop.time())

    hooks.cache(record)
    for _ in range(50):  # 0.5 s of changes, one every 10 ms
        source.version += 1
        hooks.changed()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)  # the trailing call comes by itself, without a flush
    assert seen[-1] == {"version": 1, "n": 50}
    assert 3 <= len(times) <= 8
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.09


async def test_hand_overs_take_at_most_a_tenth_of_the_time_however_slow() -> None:
    # A large state (100 000 unacked stanzas) takes long to export and save: one every
    # min_interval would leave the event loop no time for anything else.
    source = Source()
    hooks = SMStateHooks(source.export, source.load, min_interval=0.01)
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    seen: list[Any] = []

    async def slow(state: Any) -> None:
        starts.append(loop.time())
        seen.append(state)
        await asyncio.sleep(0.03)

    hooks.cache(slow)
    for _ in range(60):  # 0.6 s of changes
        source.version += 1
        hooks.changed()
        await asyncio.sleep(0.01)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps and min(gaps) >= 0.29  # ten times the 30 ms a call takes
    assert len(starts) <= 4
    await asyncio.wait_for(hooks.flush(), 0.2)  # a flush still does not wait
    assert seen[-1] == {"version": 1, "n": 60}
    with pytest.raises(ValueError, match="max_share"):
        SMStateHooks(source.export, source.load, max_share=0)


async def test_a_lone_change_after_a_quiet_spell_is_handed_over_at_once() -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load, min_interval=10.0)
    seen: list[Any] = []
    hooks.cache(seen.append)
    await asyncio.sleep(0.02)
    assert seen == [{"version": 1, "n": 0}]  # first call: nothing to wait for


async def test_session_changes_and_flush_do_not_wait_for_min_interval() -> None:
    source = Source()
    hooks = SMStateHooks(source.export, source.load, min_interval=10.0)
    seen: list[Any] = []
    hooks.cache(seen.append)
    await asyncio.sleep(0.02)
    source.version = 1
    hooks.changed()
    await asyncio.sleep(0.05)
    assert len(seen) == 1  # waiting for the interval
    await asyncio.wait_for(hooks.flush(), 1.0)
    assert seen[-1] == {"version": 1, "n": 1}
    source.ended = True
    hooks.changed(urgent=True)
    await asyncio.sleep(0.02)
    assert seen[-1] is None


def test_a_negative_min_interval_is_refused() -> None:
    source = Source()
    with pytest.raises(ValueError, match="min_interval"):
        SMStateHooks(source.export, source.load, min_interval=-1)
