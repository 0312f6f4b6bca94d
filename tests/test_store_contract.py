"""One contract for every TrackerStore: a new store is one more line in STORES.

MemoryStore is the reference; every test here runs against each store, and the
Hypothesis tests compare each store with a plain dict model.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmpp_sm_tracker import (
    DeliveryState,
    MemoryStore,
    SQLiteDatabase,
    SQLiteStore,
    StoreError,
    TrackedMessage,
    TrackerStore,
)
from xmpp_sm_tracker.core.states import IN_FLIGHT
from xmpp_sm_tracker.stores.postgres import PostgresDatabase, PostgresStore

__all__ = ["STORES", "record"]

#: name -> factory taking a private temporary directory and the pytest request (for
#: session fixtures such as the PostgreSQL cluster). Stores may open lazily.
STORES: dict[str, Callable[[Path, pytest.FixtureRequest], TrackerStore]] = {
    "memory": lambda tmp, request: MemoryStore(),
    "sqlite": lambda tmp, request: SQLiteStore(tmp / "contract.sqlite"),
    # One file for many accounts: a view, beside a neighbour with the same ids (below).
    "sqlite-database": lambda tmp, request: SQLiteDatabase(tmp / "shared.sqlite").store(
        "alice@example.org"
    ),
    # One database for the session; a new account per test sees none of the others.
    "postgres": lambda tmp, request: PostgresStore(
        request.getfixturevalue("postgres_dsn"), account=f"{uuid.uuid4().hex}@example.org"
    ),
    # A fleet's store: one account of a shared pool (the fixture closes the database).
    "postgres-shared": lambda tmp, request: PostgresDatabase(
        request.getfixturevalue("postgres_dsn"), max_connections=3
    ).store(f"{uuid.uuid4().hex}@example.org"),
}

S = DeliveryState
BOB, CAROL = "bob@example.org", "carol@example.org"


def record(
    n: int,
    state: DeliveryState = S.SENT,
    to: str = BOB,
    created: float | None = None,
    **changes: Any,
) -> TrackedMessage:
    """Record ``m<n>``, created at 1000 + n unless told otherwise."""
    base = TrackedMessage(
        id=f"m{n}",
        origin_id=f"o{n}",
        to=to,
        type="chat",
        body=f"body {n} ✓ <&> '\"; DROP TABLE records; --",
        state=state,
        xml=f"<message xmlns='jabber:client' id='m{n}'><body>body {n} ✓</body></message>",
        created_at=1000.0 + n if created is None else created,
        updated_at=2000.0 + n,
        seq=n,
    )
    return replace(base, **changes)


def ids(records: list[TrackedMessage]) -> list[str]:
    return [r.id for r in records]


@asynccontextmanager
async def beside_a_neighbour(database: SQLiteDatabase) -> AsyncIterator[None]:
    """A neighbour account in the view's database holds records with the ids the tests
    use, and an SM state: none of it may show through the view, nor be changed by it.
    The database closes at the end."""
    async with database:
        neighbour = database.store("neighbour@example.org")
        mine = [record(n, state) for n, state in enumerate(DeliveryState)]
        await neighbour.upsert(mine)
        await neighbour.save_sm_state({"version": 1, "neighbour": True})
        yield
        assert await neighbour.pending() == [r for r in mine if r.in_flight]
        assert await neighbour.load_sm_state() == {"version": 1, "neighbour": True}


@pytest_asyncio.fixture(params=list(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TrackerStore]:
    made = STORES[request.param](tmp_path, request)
    async with AsyncExitStack() as stack:
        if isinstance(made, SQLiteStore) and made.account:  # a view of a shared file
            await stack.enter_async_context(beside_a_neighbour(made.database))
        yield made
        await made.aclose()
        if isinstance(made, PostgresStore):
            await made.database.aclose()


# ------------------------------------------------------------------ records


async def test_it_is_a_tracker_store(store: TrackerStore) -> None:
    assert isinstance(store, TrackerStore)


async def test_upsert_then_get_round_trips_every_field(store: TrackerStore) -> None:
    full = record(
        1,
        S.FAILED,
        to="bob@example.org/phone",
        reason="cancel:item-not-found (gone ✓)",
        via_carbon=True,
        attempts=3,
        type="groupchat",
        created=1234567890.123456,
        updated_at=1234567899.654321,
        seq=2**32 - 1,
    )
    bare = record(2, seq=None, reason=None, body="", attempts=0)
    await store.upsert([full, bare])
    assert await store.get("m1") == full
    assert await store.get("m2") == bare
    assert await store.get("nope") is None


@pytest.mark.parametrize("state", list(DeliveryState))
async def test_every_state_round_trips(store: TrackerStore, state: DeliveryState) -> None:
    await store.upsert([record(1, state)])
    got = await store.get("m1")
    assert got is not None and got.state is state


async def test_upsert_replaces_every_field_by_id(store: TrackerStore) -> None:
    await store.upsert([record(1)])
    newer = record(1, S.FAILED, to=CAROL, body="other", reason="x", attempts=2, seq=None)
    await store.upsert([newer])
    assert await store.get("m1") == newer
    assert await store.pending() == []
    assert ids(await store.failed(CAROL)) == ["m1"]
    assert await store.conversation(BOB) == []


async def test_the_last_copy_in_one_batch_wins(store: TrackerStore) -> None:
    await store.upsert([record(1), record(1, S.ACKED), record(1, S.FAILED, reason="r")])
    got = await store.get("m1")
    assert got is not None and got.state is S.FAILED and got.reason == "r"


async def test_an_empty_upsert_changes_nothing(store: TrackerStore) -> None:
    await store.upsert([record(1)])
    await store.upsert([])
    assert ids(await store.pending()) == ["m1"]


async def test_pending_is_sent_hibernated_resent_oldest_first(store: TrackerStore) -> None:
    await store.upsert([record(n, state) for n, state in enumerate(reversed(list(S)))])
    in_flight = await store.pending()
    assert {r.state for r in in_flight} == IN_FLIGHT == {S.SENT, S.HIBERNATED, S.RESENT}
    assert [r.created_at for r in in_flight] == sorted(r.created_at for r in in_flight)


async def test_ties_on_time_go_by_seq_then_first_sight(store: TrackerStore) -> None:
    await store.upsert(
        [
            record(1, created=5.0, seq=3),
            record(2, created=5.0, seq=None),  # no seq counts as 0
            record(3, created=5.0, seq=1),
            record(4, created=4.0, seq=9),
            record(5, created=5.0, seq=None),
        ]
    )
    await store.upsert([record(2, S.RESENT, created=5.0, seq=None)])  # keeps its place
    assert ids(await store.pending()) == ["m4", "m2", "m5", "m3", "m1"]


async def test_failed_all_and_per_conversation(store: TrackerStore) -> None:
    await store.upsert(
        [
            record(3, S.FAILED, to=f"{BOB}/phone"),
            record(1, S.FAILED, to=CAROL),
            record(2, S.FAILED, to=BOB),
            record(4, S.ACKED, to=BOB),
            record(5, S.SENT, to=BOB),
        ]
    )
    assert ids(await store.failed()) == ["m1", "m2", "m3"]
    assert ids(await store.failed(BOB)) == ["m2", "m3"]
    assert ids(await store.failed(CAROL)) == ["m1"]
    assert await store.failed("dave@example.org") == []


async def test_conversation_pages_backwards_oldest_first(store: TrackerStore) -> None:
    await store.upsert([record(n, S.ACKED) for n in range(10)])
    await store.upsert([record(99, S.FAILED, to=f"{CAROL}/x", created=1003.5)])
    await store.upsert([record(50, S.SENT, to=f"{BOB}/laptop", created=1004.5)])
    assert ids(await store.conversation(BOB, limit=3)) == ["m7", "m8", "m9"]
    page = await store.conversation(f"{BOB}/any", limit=3, before=1005.0)
    assert ids(page) == ["m3", "m4", "m50"]
    assert ids(await store.conversation(BOB, limit=3, before=page[0].created_at)) == [
        "m0",
        "m1",
        "m2",
    ]
    assert await store.conversation(BOB, limit=3, before=1000.0) == []
    assert ids(await store.conversation(CAROL)) == ["m99"]
    assert len(await store.conversation(BOB)) == 11  # default limit 50
    assert await store.conversation(BOB, limit=0) == []
    assert await store.conversation(BOB, limit=-1) == []
    assert await store.conversation("nobody@example.org") == []


async def test_delete_one(store: TrackerStore) -> None:
    await store.upsert([record(1), record(2)])
    assert await store.delete("m1") is True
    assert await store.delete("m1") is False
    assert await store.delete("never") is False
    assert await store.get("m1") is None
    assert ids(await store.pending()) == ["m2"]


async def test_a_deleted_record_comes_back_as_new(store: TrackerStore) -> None:
    await store.upsert([record(1, created=1.0), record(2, created=1.0, seq=1)])
    await store.delete("m1")
    await store.upsert([record(1, created=1.0)])
    assert ids(await store.pending()) == ["m2", "m1"]


async def test_delete_failed_only_touches_failed_per_conversation(store: TrackerStore) -> None:
    await store.upsert(
        [
            record(1, S.FAILED),
            record(2, S.FAILED, to=f"{CAROL}/x"),
            record(3, S.FAILED, to=f"{BOB}/phone"),
            record(4, S.ACKED),
            record(5, S.SENT, to=CAROL),
        ]
    )
    assert await store.delete_failed("dave@example.org") == 0
    assert await store.delete_failed(BOB) == 2
    assert ids(await store.failed()) == ["m2"]
    assert await store.delete_failed() == 1
    assert await store.delete_failed() == 0
    assert await store.failed() == []
    assert await store.get("m4") is not None
    assert ids(await store.pending()) == ["m5"]


async def test_batches_of_a_thousand(store: TrackerStore) -> None:
    batch = [record(n, to=BOB if n % 2 else CAROL) for n in range(1000)]
    await store.upsert(batch)
    assert await store.pending() == batch
    await store.upsert([replace(r, state=S.FAILED, reason="session-ended") for r in batch])
    assert await store.pending() == []
    assert len(await store.failed()) == 1000
    assert ids(await store.conversation(BOB, limit=1000)) == [f"m{n}" for n in range(1, 1000, 2)]
    assert await store.delete_failed(CAROL) == 500
    assert await store.delete_failed() == 500
    assert await store.get("m999") is None


# ------------------------------------------------------------------ SM state

NESTED = {
    "version": 1,
    "jid": "alice@example.org/ü",
    "id": "stream-1",
    "location": None,
    "handled": 2**32 - 1,
    "last_ack": 0,
    "enabled": True,
    "ratio": 2.5,
    "unacked": [{"seq": 1, "xml": "<message id='a'><body>\"hi\"</body></message>"}, {}],
    "deep": {"a": {"b": {"c": [[], [1, [2, {"d": None}]]]}}},
}


async def test_sm_state_round_trip_overwrite_and_forget(store: TrackerStore) -> None:
    assert await store.load_sm_state() is None
    await store.save_sm_state(None)  # forgetting nothing is fine
    await store.save_sm_state(NESTED)
    assert await store.load_sm_state() == NESTED
    await store.save_sm_state({"version": 1, "other": []})
    assert await store.load_sm_state() == {"version": 1, "other": []}
    await store.save_sm_state(None)
    assert await store.load_sm_state() is None


async def test_sm_state_is_a_copy_both_ways(store: TrackerStore) -> None:
    state: dict[str, Any] = {"version": 1, "unacked": [{"seq": 1}]}
    await store.save_sm_state(state)
    state["unacked"].append({"seq": 2})  # changing ours afterwards changes nothing stored
    first = await store.load_sm_state()
    assert first == {"version": 1, "unacked": [{"seq": 1}]}
    assert first is not None
    first["unacked"].clear()
    second = await store.load_sm_state()
    assert second == {"version": 1, "unacked": [{"seq": 1}]}
    assert second is not first


async def test_records_and_sm_state_do_not_touch(store: TrackerStore) -> None:
    await store.save_sm_state(NESTED)
    await store.upsert([record(1, S.FAILED)])
    await store.delete_failed()
    assert await store.load_sm_state() == NESTED
    await store.upsert([record(2)])
    await store.save_sm_state(None)
    assert ids(await store.pending()) == ["m2"]


# ------------------------------------------------------------------ closing

CALLS: dict[str, Callable[[TrackerStore], Awaitable[object]]] = {
    "upsert": lambda s: s.upsert([record(1)]),
    "upsert-empty": lambda s: s.upsert([]),
    "get": lambda s: s.get("m1"),
    "pending": lambda s: s.pending(),
    "failed": lambda s: s.failed(),
    "failed-one": lambda s: s.failed(BOB),
    "conversation": lambda s: s.conversation(BOB),
    "conversation-empty": lambda s: s.conversation(BOB, limit=0),
    "delete": lambda s: s.delete("m1"),
    "delete_failed": lambda s: s.delete_failed(),
    "delete_failed-one": lambda s: s.delete_failed(BOB),
    "save_sm_state": lambda s: s.save_sm_state({"version": 1}),
    "save_sm_state-none": lambda s: s.save_sm_state(None),
    "load_sm_state": lambda s: s.load_sm_state(),
}


async def test_aclose_twice_is_harmless(store: TrackerStore) -> None:
    await store.upsert([record(1)])
    await store.aclose()
    await store.aclose()


@pytest.mark.parametrize("call", list(CALLS))
async def test_every_call_after_aclose_is_a_store_error(store: TrackerStore, call: str) -> None:
    await store.upsert([record(1, S.FAILED)])
    await store.aclose()
    with pytest.raises(StoreError):
        await CALLS[call](store)


async def test_a_store_closed_before_first_use_refuses_calls(store: TrackerStore) -> None:
    await store.aclose()
    with pytest.raises(StoreError):
        await store.pending()


# ------------------------------------------------------------------ models

IDS = [f"m{n}" for n in range(8)]
TARGETS = [BOB, f"{BOB}/phone", CAROL, f"{CAROL}/x"]
CONVERSATIONS = [BOB, CAROL, "dave@example.org"]

records_st = st.builds(
    lambda n, state, to, created, updated, seq, reason: record(
        n, state, to=to, created=created, updated_at=updated, seq=seq, reason=reason
    ),
    n=st.integers(0, len(IDS) - 1),
    state=st.sampled_from(list(DeliveryState)),
    to=st.sampled_from(TARGETS),
    created=st.sampled_from([1.0, 2.0, 3.0]),  # few values: many ties to order
    # Few values too: a record often comes again with only its state or time changed
    # (a store may write that narrowly), and as often with more.
    updated=st.sampled_from([2000.0, 2001.0]),
    seq=st.none() | st.integers(0, 3),
    reason=st.none() | st.sampled_from(["", "resume-failed", "wait:x"]),
)
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.lists(records_st, max_size=4)),
        st.tuples(st.just("delete"), st.sampled_from(IDS)),
        st.tuples(st.just("delete_failed"), st.none() | st.sampled_from(CONVERSATIONS)),
    ),
    max_size=25,
)


def oldest_first(records: list[TrackedMessage]) -> list[TrackedMessage]:
    return sorted(records, key=lambda r: (r.created_at, r.seq or 0))


async def reset(store: TrackerStore) -> None:
    """Hypothesis reuses the fixture's store: start every example empty."""
    for message_id in IDS:
        await store.delete(message_id)
    await store.save_sm_state(None)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=ops_st,
    limit=st.integers(0, 9),
    before=st.none() | st.sampled_from([1.0, 2.0, 2.5, 3.0, 9.0]),
)
async def test_random_operations_match_a_dict_model(
    store: TrackerStore,
    ops: list[tuple[str, Any]],
    limit: int,
    before: float | None,
) -> None:
    await reset(store)
    # A dict keeps a replaced key in its first place, like every store must.
    model: dict[str, TrackedMessage] = {}
    for op, arg in ops:
        if op == "upsert":
            await store.upsert(arg)
            for r in arg:
                model[r.id] = r
        elif op == "delete":
            assert await store.delete(arg) is (model.pop(arg, None) is not None)
        else:
            doomed = [
                k
                for k, r in model.items()
                if r.state is S.FAILED and (arg is None or r.conversation == arg)
            ]
            assert await store.delete_failed(arg) == len(doomed)
            for key in doomed:
                del model[key]

    for message_id in IDS:
        assert await store.get(message_id) == model.get(message_id)
    everything = list(model.values())
    assert await store.pending() == oldest_first([r for r in everything if r.in_flight])
    failed = oldest_first([r for r in everything if r.state is S.FAILED])
    assert await store.failed() == failed
    for jid in CONVERSATIONS:
        assert await store.failed(jid) == [r for r in failed if r.conversation == jid]
    for jid in TARGETS:
        bare = jid.split("/", 1)[0]
        page = oldest_first(
            [
                r
                for r in everything
                if r.conversation == bare and (before is None or r.created_at < before)
            ]
        )
        expected = page[-limit:] if limit > 0 else []
        assert await store.conversation(jid, limit=limit, before=before) == expected


json_st = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=15,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=st.dictionaries(st.text(max_size=5), json_st, max_size=4))
async def test_any_json_sm_state_round_trips(store: TrackerStore, state: dict[str, Any]) -> None:
    await store.save_sm_state(state)
    assert await store.load_sm_state() == state
