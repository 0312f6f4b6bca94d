"""Issue 17: an awaitable outcome per message (``MessageHandle``), live and in the core."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from xmpp_sm_tracker import DeliveryState, MessageFailed, MessageHandle, RetryPolicy, TrackerClosed
from xmpp_sm_tracker.core.records import TrackedMessage
from xmpp_sm_tracker.handles import HandleRegistry
from xmpp_sm_tracker.stanzas import MARKERS_NS, RECEIPTS_NS
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool, Party, wait_for

from .test_live_restart import crash_child_with_messages_in_a_blackhole, restarted_alice, start_bob

S = DeliveryState
FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}
SILENT = {**FAST, "ack_every": 100_000, "ack_delay": 3600.0, "ack_at_burst_end": False}


def answer_with(bob: Party, namespace: str, tag: str) -> None:
    """bob answers every message with a receipt or a marker, from his own full JID."""

    def on_message(message: Any) -> None:
        if message["type"] != "chat" or not message["body"]:
            return
        reply = bob.xmpp.make_message(mto=message["from"], mtype="chat")
        reply.append(slixmpp.xmlstream.ET.Element(f"{{{namespace}}}{tag}", {"id": message["id"]}))
        reply.send()

    bob.xmpp.add_event_handler("message", on_message)


# ---------------------------------------------------------------- live


async def test_send_message_returns_a_handle_that_settles_acked(
    server: LocalXMPPServer, clients: ClientPool
) -> None:
    await clients("bob", server.address, tracked=False)
    alice = await clients("alice", server.address, **FAST)
    handle = await alice.tracker.send_message("bob@localhost", "hi")
    assert isinstance(handle, MessageHandle)
    assert handle.state in {S.SENT, S.ACKED}
    record = await handle.settled(timeout=10)
    assert record.state is S.ACKED and record.id == handle.id
    assert handle.state is S.ACKED
    assert await handle.settled(timeout=0) is record  # settled once: at once from now on
    assert await alice.tracker.handle(handle.id) is handle  # one handle per message


async def test_delivered_and_displayed_wait_for_the_peers_receipt_and_marker(
    server: LocalXMPPServer, clients: ClientPool
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    carol = await clients("carol", server.address, tracked=False)
    answer_with(bob, RECEIPTS_NS, "received")
    answer_with(carol, MARKERS_NS, "displayed")
    alice = await clients("alice", server.address, **FAST)
    to_bob = await alice.tracker.send_message("bob@localhost", "receipt, please")
    to_carol = await alice.tracker.send_message("carol@localhost", "marker, please")
    delivered = await to_bob.delivered(timeout=10)
    assert delivered.state is S.DELIVERED
    displayed = await to_carol.displayed(timeout=10)
    assert displayed.state is S.DISPLAYED
    assert (await to_carol.delivered(timeout=0)).state is S.DISPLAYED  # implies delivery
    with pytest.raises(TimeoutError):
        await to_bob.displayed(timeout=0.3)  # bob sends receipts, never markers


async def test_a_receipt_from_someone_else_does_not_deliver_it(
    server: LocalXMPPServer, clients: ClientPool
) -> None:
    await clients("bob", server.address, tracked=False)
    mallory = await clients("carol", server.address, tracked=False)  # not bob
    alice = await clients("alice", server.address, **FAST)
    handle = await alice.tracker.send_message("bob@localhost", "for bob only")
    await handle.settled(timeout=10)
    forged = mallory.xmpp.make_message(mto=alice.xmpp.boundjid.full, mtype="chat")
    forged.append(slixmpp.xmlstream.ET.Element(f"{{{RECEIPTS_NS}}}received", {"id": handle.id}))
    forged.send()
    with pytest.raises(TimeoutError):
        await handle.delivered(timeout=0.5)
    assert handle.state is S.ACKED


async def test_the_same_handle_settles_once_through_a_cut_and_resumption(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
    proxy.stall()
    handles = [await alice.tracker.send_message("bob@localhost", f"cut {i}") for i in range(5)]
    settling = [asyncio.ensure_future(h.settled(timeout=20)) for h in handles]
    await wait_for(lambda: alice.on_wire([h.id for h in handles]))
    proxy.cut()
    proxy.heal()
    await wait_for(lambda: all(h.state is not S.SENT for h in handles))
    records = await asyncio.gather(*settling)
    assert [r.state for r in records] == [S.ACKED] * 5
    assert all(alice.log.names_for(h.id)[-1] == "message:acked" for h in handles)
    assert [r.id for r in records] == [h.id for h in handles]
    await wait_for(lambda: len(bob.received.bodies) == 5)


async def test_a_failed_resumption_settles_failed_and_delivered_raises(
    fresh_server: LocalXMPPServer, clients: ClientPool
) -> None:
    async with FaultProxy(fresh_server.host, fresh_server.c2s_port) as proxy:
        await clients("bob", fresh_server.address, tracked=False)
        alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
        proxy.blackhole()
        handle = await alice.tracker.send_message("bob@localhost", "lost")
        await wait_for(lambda: alice.on_wire([handle.id]))
        proxy.heal()
        await fresh_server.restart()  # the session is gone: the resumption fails
        proxy.cut()
        record = await handle.settled(timeout=20)
        assert record.state is S.FAILED and record.reason == "resume-failed"
        with pytest.raises(MessageFailed) as raised:
            await handle.delivered(timeout=1)
        assert raised.value.record.id == handle.id


async def test_with_a_retry_policy_a_failure_it_will_retry_is_not_the_outcome(
    fresh_server: LocalXMPPServer, clients: ClientPool
) -> None:
    async with FaultProxy(fresh_server.host, fresh_server.c2s_port) as proxy:
        await clients("bob", fresh_server.address, tracked=False)
        alice = await clients(
            "alice", (proxy.host, proxy.port), retry_policy=RetryPolicy(delay=0.5), **FAST
        )
        proxy.blackhole()
        handle = await alice.tracker.send_message("bob@localhost", "retried")
        settling = asyncio.ensure_future(handle.settled(timeout=30))
        await wait_for(lambda: alice.on_wire([handle.id]))
        proxy.heal()
        await fresh_server.restart()
        proxy.cut()
        await wait_for(lambda: alice.log.count("message:failed") == 1, timeout=20)
        assert not settling.done()  # a retry is due: failed is not the outcome yet
        record = await settling
        assert record.state is S.ACKED and record.attempts == 2


async def test_a_handle_for_a_message_a_killed_process_sent(
    server: LocalXMPPServer, tmp_path: Path
) -> None:
    db = tmp_path / "alice.sqlite"
    bob, _ = await start_bob(server)
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        await crash_child_with_messages_in_a_blackhole(db, proxy)
        alice, store, _ = await restarted_alice(db, proxy.address)
        try:
            in_flight = await store.pending()
            assert in_flight
            handles = [await tracker_handle(alice, r.id) for r in in_flight]
            records = await asyncio.gather(*(h.settled(timeout=20) for h in handles))
            assert {r.state for r in records} == {S.ACKED}
        finally:
            alice.disconnect(wait=0.5)
            bob.disconnect(wait=0.5)
            await asyncio.sleep(0.2)
            await store.aclose()


async def tracker_handle(xmpp: Any, message_id: str) -> MessageHandle:
    handle: MessageHandle = await xmpp.plugin["sm_tracker"].handle(message_id)
    return handle


async def test_unknown_ids_and_untracked_messages_are_clear_errors(
    server: LocalXMPPServer, clients: ClientPool
) -> None:
    alice = await clients("alice", server.address, **FAST)
    with pytest.raises(KeyError, match="no tracked message"):
        await alice.tracker.handle("never-sent")


async def test_waiters_hear_the_tracker_ended_rather_than_hang(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
    proxy.stall()
    handle = await alice.tracker.send_message("bob@localhost", "never acked")
    waiting = asyncio.ensure_future(handle.settled(timeout=10))
    await asyncio.sleep(0.1)
    alice.xmpp.plugin.disable("sm_tracker")
    with pytest.raises(TrackerClosed):
        await waiting
    with pytest.raises(TrackerClosed):
        await handle.settled(timeout=1)
    proxy.heal()


# ---------------------------------------------------------------- the registry alone


def record(state: DeliveryState, reason: str | None = None) -> TrackedMessage:
    return TrackedMessage(
        id="m1",
        origin_id="m1",
        to="bob@example.org",
        type="chat",
        body="hi",
        state=state,
        xml="<message/>",
        created_at=1.0,
        updated_at=1.0,
        reason=reason,
    )


async def test_a_handle_follows_every_snapshot_and_wakes_only_the_matching_waiters() -> None:
    registry = HandleRegistry()
    handle = registry.handle(record(S.SENT), retry_pending=False)
    settled = asyncio.ensure_future(handle.settled())
    delivered = asyncio.ensure_future(handle.delivered())
    await asyncio.sleep(0)
    registry.observe(record(S.HIBERNATED), retry_pending=False)
    registry.observe(record(S.RESENT), retry_pending=False)
    await asyncio.sleep(0)
    assert not settled.done() and handle.state is S.RESENT
    registry.observe(record(S.ACKED), retry_pending=False)
    assert (await settled).state is S.ACKED
    assert not delivered.done()
    registry.observe(record(S.DELIVERED), retry_pending=False)
    assert (await delivered).state is S.DELIVERED


async def test_a_failure_with_a_retry_pending_is_not_settled_a_final_one_is() -> None:
    registry = HandleRegistry()
    handle = registry.handle(record(S.SENT), retry_pending=False)
    settled = asyncio.ensure_future(handle.settled())
    delivered = asyncio.ensure_future(handle.delivered())
    await asyncio.sleep(0)
    registry.observe(record(S.FAILED, "session-ended"), retry_pending=True)
    await asyncio.sleep(0)
    assert not settled.done() and not delivered.done()
    registry.observe(record(S.FAILED, "retries-exhausted"), retry_pending=False)
    assert (await settled).reason == "retries-exhausted"
    with pytest.raises(MessageFailed, match="retries-exhausted"):
        await delivered


async def test_a_hand_resend_after_the_outcome_starts_a_new_wait() -> None:
    registry = HandleRegistry()
    handle = registry.handle(record(S.FAILED, "session-ended"), retry_pending=False)
    assert (await handle.settled(timeout=0)).state is S.FAILED
    registry.observe(record(S.RESENT), retry_pending=False)
    again = asyncio.ensure_future(handle.settled())
    await asyncio.sleep(0)
    assert not again.done()
    registry.observe(record(S.ACKED), retry_pending=False)
    assert (await again).state is S.ACKED


async def test_a_timed_out_wait_leaves_no_waiter_behind() -> None:
    registry = HandleRegistry()
    handle = registry.handle(record(S.SENT), retry_pending=False)
    with pytest.raises(TimeoutError):
        await handle.settled(timeout=0.01)
    registry.observe(record(S.ACKED), retry_pending=False)  # nobody to wake: no error
    assert handle.state is S.ACKED


async def test_handles_the_app_dropped_cost_nothing() -> None:
    registry = HandleRegistry()
    handle = registry.handle(record(S.SENT), retry_pending=False)
    assert len(registry) == 1
    assert registry.handle(record(S.ACKED), retry_pending=False) is handle
    del handle
    gc.collect()
    assert len(registry) == 0
    registry.observe(record(S.ACKED), retry_pending=False)  # no handle: nothing happens


async def test_a_closed_registry_fails_new_and_old_waits() -> None:
    registry = HandleRegistry()
    handle = registry.handle(record(S.SENT), retry_pending=False)
    waiting = asyncio.ensure_future(handle.settled())
    await asyncio.sleep(0)
    registry.close()
    with pytest.raises(TrackerClosed):
        await waiting
    late = registry.handle(record(S.SENT), retry_pending=False)
    with pytest.raises(TrackerClosed):
        await late.settled()
