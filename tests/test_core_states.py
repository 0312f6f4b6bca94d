"""The transition table: a later signal never moves a message backwards."""

from __future__ import annotations

import itertools
from dataclasses import FrozenInstanceError, fields, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_sm_tracker.core.records import TrackedMessage, build_record
from xmpp_sm_tracker.core.states import (
    IN_FLIGHT,
    SETTLED,
    TRANSITIONS,
    DeliveryState,
    IllegalTransition,
    Step,
    next_state,
)

S = DeliveryState
M, K = Step.MOVE, Step.KEEP

#: The contract, written out pair by pair from DESIGN.md "States". Absent = illegal.
EXPECTED: dict[tuple[DeliveryState, DeliveryState], Step] = {
    # In flight: anything the stream or the peer says moves it.
    **{(s, sig): M for s in (S.SENT, S.RESENT) for sig in set(S) - {S.SENT}},
    (S.HIBERNATED, S.HIBERNATED): K,
    **{(S.HIBERNATED, sig): M for sig in set(S) - {S.SENT, S.HIBERNATED}},
    # The server has it: only proof of more, or an error bounce, moves it.
    (S.ACKED, S.ACKED): K,
    (S.ACKED, S.ROOM_RECEIVED): M,
    (S.ACKED, S.DELIVERED): M,
    (S.ACKED, S.DISPLAYED): M,
    (S.ACKED, S.FAILED): M,  # error bounce after the ack
    # The room has it: stream trouble changes nothing; receipts and markers go forward.
    (S.ROOM_RECEIVED, S.HIBERNATED): K,
    (S.ROOM_RECEIVED, S.RESENT): K,
    (S.ROOM_RECEIVED, S.ACKED): K,  # late <a/> after the reflection
    (S.ROOM_RECEIVED, S.ROOM_RECEIVED): K,
    (S.ROOM_RECEIVED, S.DELIVERED): M,
    (S.ROOM_RECEIVED, S.DISPLAYED): M,
    (S.ROOM_RECEIVED, S.FAILED): K,
    **{
        (S.DELIVERED, sig): K
        for sig in (S.HIBERNATED, S.RESENT, S.ACKED, S.ROOM_RECEIVED, S.DELIVERED, S.FAILED)
    },
    (S.DELIVERED, S.DISPLAYED): M,
    **{(S.DISPLAYED, sig): K for sig in set(S) - {S.SENT}},
    # "Failed" means "not confirmed": a confirmation upgrades it, a resend restarts it,
    # a failure with a new reason (a refusal after an attempt timeout) replaces it.
    (S.FAILED, S.RESENT): M,
    (S.FAILED, S.ACKED): M,
    (S.FAILED, S.ROOM_RECEIVED): M,
    (S.FAILED, S.DELIVERED): M,
    (S.FAILED, S.DISPLAYED): M,
    (S.FAILED, S.FAILED): M,
}

ALL_PAIRS = list(itertools.product(S, S))

#: How far along a state is; a MOVE never goes to a lower rank (FAILED and the
#: in-flight states are handled separately: they restart or end the cycle).
RANK = {S.ACKED: 1, S.ROOM_RECEIVED: 2, S.DELIVERED: 3, S.DISPLAYED: 4}


def test_state_values_are_the_event_suffixes() -> None:
    assert [s.value for s in S] == [
        "sent",
        "hibernated",
        "resent",
        "acked",
        "room_received",
        "delivered",
        "displayed",
        "failed",
    ]


def test_in_flight_and_settled_partition_the_states() -> None:
    assert {S.SENT, S.HIBERNATED, S.RESENT} == IN_FLIGHT
    assert set(S) == IN_FLIGHT | SETTLED
    assert not IN_FLIGHT & SETTLED


def test_table_has_a_row_for_every_state_and_only_steps() -> None:
    assert set(TRANSITIONS) == set(S)
    for row in TRANSITIONS.values():
        assert set(row) <= set(S)
        assert all(isinstance(step, Step) for step in row.values())


def test_table_matches_the_design_pair_by_pair() -> None:
    actual = {(cur, sig): step for cur, row in TRANSITIONS.items() for sig, step in row.items()}
    assert actual == EXPECTED


@pytest.mark.parametrize(("current", "signal"), ALL_PAIRS, ids=lambda s: s.name)
def test_next_state_follows_the_table(current: DeliveryState, signal: DeliveryState) -> None:
    step = EXPECTED.get((current, signal))
    if step is None:
        with pytest.raises(IllegalTransition, match=f"{current.name} -> {signal.name}"):
            next_state(current, signal)
    elif step is M:
        assert next_state(current, signal) is signal
    else:
        assert next_state(current, signal) is None


@pytest.mark.parametrize("current", list(S), ids=lambda s: s.name)
def test_nothing_moves_into_sent(current: DeliveryState) -> None:
    assert S.SENT not in TRANSITIONS[current]
    with pytest.raises(IllegalTransition):
        next_state(current, S.SENT)


def test_every_legal_signal_is_known_from_every_non_final_state() -> None:
    # Every signal that can reach a state other than SENT is answered by every row,
    # except the three pairs that only a tracker bug could produce.
    deliberately_illegal = {
        (S.ACKED, S.HIBERNATED),
        (S.ACKED, S.RESENT),
        (S.FAILED, S.HIBERNATED),
    }
    for current, signal in ALL_PAIRS:
        if signal is S.SENT or (current, signal) in deliberately_illegal:
            continue
        assert signal in TRANSITIONS[current], (current, signal)


def test_a_move_never_goes_backwards() -> None:
    for current, row in TRANSITIONS.items():
        for signal, step in row.items():
            if step is not M or current not in RANK or signal not in RANK:
                continue
            assert RANK[signal] > RANK[current], (current, signal)


def test_a_settled_state_never_returns_in_flight_except_failed_resent() -> None:
    for current in SETTLED:
        for signal in IN_FLIGHT:
            step = TRANSITIONS[current].get(signal)
            if (current, signal) == (S.FAILED, S.RESENT):
                assert step is M
            else:
                assert step is not M, (current, signal)


def test_keep_only_for_the_same_or_a_weaker_signal() -> None:
    for current, row in TRANSITIONS.items():
        for signal, step in row.items():
            if step is not K or signal is current:
                continue
            # Kept: stream trouble or a bounce after the room/peer has it, or a
            # confirmation the message has already gone past.
            assert current in RANK, (current, signal)
            weaker = signal in IN_FLIGHT or signal is S.FAILED or RANK[signal] < RANK[current]
            assert weaker, (current, signal)


@pytest.mark.parametrize(
    ("current", "signal", "expected"),
    [
        (S.ROOM_RECEIVED, S.ACKED, None),
        (S.DELIVERED, S.DISPLAYED, S.DISPLAYED),
        (S.DISPLAYED, S.DELIVERED, None),
        (S.ACKED, S.FAILED, S.FAILED),
        (S.FAILED, S.RESENT, S.RESENT),
        (S.FAILED, S.ACKED, S.ACKED),
        (S.HIBERNATED, S.RESENT, S.RESENT),
        (S.RESENT, S.HIBERNATED, S.HIBERNATED),
        (S.HIBERNATED, S.HIBERNATED, None),
        (S.ROOM_RECEIVED, S.FAILED, None),
        (S.FAILED, S.FAILED, S.FAILED),  # a bounce after the attempt timeout: new reason
    ],
)
def test_named_examples(
    current: DeliveryState, signal: DeliveryState, expected: DeliveryState | None
) -> None:
    assert next_state(current, signal) is expected


@pytest.mark.parametrize(
    ("current", "signal"),
    [(S.SENT, S.SENT), (S.ACKED, S.HIBERNATED), (S.ACKED, S.RESENT), (S.FAILED, S.HIBERNATED)],
)
def test_illegal_pairs_raise(current: DeliveryState, signal: DeliveryState) -> None:
    with pytest.raises(IllegalTransition):
        next_state(current, signal)


def test_illegal_transition_is_a_bug_not_a_user_error() -> None:
    assert issubclass(IllegalTransition, RuntimeError)


# ---------------------------------------------------------------- record snapshots

_values = st.tuples(
    st.text(max_size=8),
    st.text(max_size=8),
    st.text(max_size=8),
    st.sampled_from(["chat", "normal", "groupchat"]),
    st.text(max_size=8),
    st.sampled_from(list(DeliveryState)),
    st.text(max_size=8),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False),
    st.booleans(),
    st.integers(min_value=1, max_value=9),
    st.none() | st.text(max_size=8),
    st.none() | st.integers(min_value=0, max_value=2**32 - 1),
)


@given(_values)
def test_the_fast_snapshot_builder_makes_exactly_the_dataclass(values: tuple[Any, ...]) -> None:
    # records.build_record fills a twin's slots and then makes it a TrackedMessage, for
    # speed: it must be indistinguishable from the dataclass constructor, and frozen.
    built, constructed = build_record(*values), TrackedMessage(*values)
    assert built == constructed and hash(built) == hash(constructed)
    assert type(built) is TrackedMessage and repr(built) == repr(constructed)
    assert [getattr(built, f.name) for f in fields(TrackedMessage)] == list(values)
    with pytest.raises(FrozenInstanceError):
        built.state = DeliveryState.FAILED  # type: ignore[misc]
    moved = built.moved(DeliveryState.FAILED, 5.0, reason="x", seq=7)
    assert moved == replace(
        constructed, state=DeliveryState.FAILED, updated_at=5.0, reason="x", seq=7
    )
