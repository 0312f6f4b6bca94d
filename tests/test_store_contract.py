"""One contract for every TrackerStore. A new store is one more entry in STORES."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmpp_sm_tracker import (
    DeliveryState,
    MemoryStore,
    SQLiteStore,
    StoreError,
    TrackedMessage,
    TrackerStore,
)

StoreFactory = Callable[[Path], Awaitable[TrackerStore]]


async def _memory(_: Path) -> TrackerStore:
    return MemoryStore()


async def _sqlite(tmp: Path) -> TrackerStore:
    store = SQLiteStore(tmp / "contract.sqlite")
    await store.open()
    return store


STORES: dict[str, StoreFactory] = {"memory": _memory, "sqlite": _sqlite}

S = DeliveryState


def record(
    n: int,
    state: DeliveryState = S.SENT,
    to: str = "bob@example.org",
    created: float | None = None,
    **changes: object,
) -> TrackedMessage:
    base = TrackedMessage(
        id=f"m{n}",
        origin_id=f"o{n}",
        to=to,
        type="chat",
        body=f"body {n} ✓ <&>",
        state=state,
        xml=f"<message xmlns='jabber:client' id='m{n}'><body>body {n}</body></message>",
        created_at=1000.0 + n if created is None else created,
        updated_at=2000.0 + n,
        seq=n,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest_asyncio.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TrackerStore]:
    made = await STORES[request.param](tmp_path)
    yield made
    await made.aclose()


async def test_upsert_then_get_round_trips_every_field(store: TrackerStore) -> None:
    original = record(1, S.FAILED, reason="cancel:item-not-found", via_carbon=True, attempts=3)
    await store.upsert([original])
    assert await store.get("m1") == original
    assert await store.get("nope") is None


async def test_upsert_replaces_by_id(store: TrackerStore) -> None:
    await store.upsert([record(1)])
    await store.upsert([record(1, S.ACKED)])
    got = await store.get("m1")
    assert got is not None and got.state is S.ACKED
    assert await store.pending() == []


async def test_pending_lists_in_flight_oldest_first(store: TrackerStore) -> None:
    await store.upsert(
        [record(3, S.RESENT), record(1, S.SENT), record(2, S.HIBERNATED), record(4, S.ACKED)]
    )
    assert [r.id for r in await store.pending()] == ["m1", "m2", "m3"]


async def test_failed_all_and_per_conversation(store: TrackerStore) -> None:
    await store.upsert(
        [
            record(1, S.FAILED, to="bob@example.org/phone"),
            record(2, S.FAILED, to="carol@example.org"),
            record(3, S.ACKED, to="bob@example.org"),
        ]
    )
    assert [r.id for r in await store.failed()] == ["m1", "m2"]
    assert [r.id for r in await store.failed("bob@example.org")] == ["m1"]


async def test_conversation_pages_newest_before_a_time_oldest_first(store: TrackerStore) -> None:
    await store.upsert([record(n, S.ACKED) for n in range(10)])
    await store.upsert([record(99, S.ACKED, to="carol@example.org")])
    assert [r.id for r in await store.conversation("bob@example.org", limit=3)] == [
        "m7",
        "m8",
        "m9",
    ]
    page = await store.conversation("bob@example.org/any", limit=3, before=1005.0)
    assert [r.id for r in page] == ["m2", "m3", "m4"]
    assert await store.conversation("bob@example.org", limit=0) == []


async def test_delete_and_delete_failed(store: TrackerStore) -> None:
    await store.upsert(
        [
            record(1, S.FAILED),
            record(2, S.FAILED, to="carol@example.org"),
            record(3, S.FAILED),
            record(4, S.ACKED),
        ]
    )
    assert await store.delete("m4") is True
    assert await store.delete("m4") is False
    assert await store.delete_failed("bob@example.org") == 2
    assert [r.id for r in await store.failed()] == ["m2"]
    assert await store.delete_failed() == 1
    assert await store.failed() == []


async def test_a_batch_of_a_thousand(store: TrackerStore) -> None:
    await store.upsert([record(n) for n in range(1000)])
    assert len(await store.pending()) == 1000
    await store.upsert([record(n, S.ACKED) for n in range(1000)])
    assert await store.pending() == []


async def test_sm_state_round_trip_and_forget(store: TrackerStore) -> None:
    assert await store.load_sm_state() is None
    state = {"version": 1, "unacked": [{"seq": 1, "xml": "<message/>", "id": None}], "n": 2.5}
    await store.save_sm_state(state)
    loaded = await store.load_sm_state()
    assert loaded == state
    assert loaded is not state
    await store.save_sm_state(None)
    assert await store.load_sm_state() is None


async def test_close_twice_then_use_is_an_error(store: TrackerStore) -> None:
    await store.aclose()
    await store.aclose()
    with pytest.raises(StoreError):
        await store.get("m1")


@pytest.mark.parametrize("kind", sorted(STORES))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["upsert", "delete", "delete_failed"]),
            st.integers(0, 8),
            st.sampled_from(list(DeliveryState)),
        ),
        max_size=30,
    )
)
async def test_random_operations_match_a_dict_model(
    kind: str, tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, DeliveryState]]
) -> None:
    store = await STORES[kind](tmp_path_factory.mktemp(kind))
    model: dict[str, TrackedMessage] = {}
    try:
        for op, n, state in ops:
            if op == "upsert":
                model[f"m{n}"] = record(n, state)
                await store.upsert([model[f"m{n}"]])
            elif op == "delete":
                assert await store.delete(f"m{n}") is (model.pop(f"m{n}", None) is not None)
            else:
                doomed = [k for k, r in model.items() if r.state is S.FAILED]
                assert await store.delete_failed() == len(doomed)
                for key in doomed:
                    del model[key]
        for n in range(9):
            assert await store.get(f"m{n}") == model.get(f"m{n}")
        expected_pending = sorted(
            (r for r in model.values() if r.in_flight), key=lambda r: r.created_at
        )
        assert await store.pending() == expected_pending
    finally:
        await store.aclose()
