"""Sequence arithmetic modulo 2**32 (XEP-0198 §4: h and seq wrap from 2**32-1 to 0)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_sm_tracker.core.counters import HALF_RANGE, MAX_SEQ, distance, is_behind, seq_add

counters = st.integers(min_value=0, max_value=MAX_SEQ - 1)
near_wrap = st.integers(min_value=MAX_SEQ - 50, max_value=MAX_SEQ - 1)
any_counter = st.one_of(counters, near_wrap, st.sampled_from([0, 1, MAX_SEQ - 1]))
steps = st.integers(min_value=0, max_value=3 * MAX_SEQ)


def test_constants() -> None:
    assert MAX_SEQ == 2**32
    assert HALF_RANGE == 2**31


@pytest.mark.parametrize(
    ("seq", "n", "expected"),
    [
        (0, 1, 1),
        (41, 1, 42),
        (MAX_SEQ - 1, 1, 0),
        (MAX_SEQ - 2, 5, 3),
        (MAX_SEQ - 1, MAX_SEQ, MAX_SEQ - 1),
        (0, -1, MAX_SEQ - 1),
    ],
)
def test_seq_add_examples(seq: int, n: int, expected: int) -> None:
    assert seq_add(seq, n) == expected


def test_seq_add_defaults_to_one() -> None:
    assert seq_add(7) == 8
    assert seq_add(MAX_SEQ - 1) == 0


@pytest.mark.parametrize(
    ("older", "newer", "expected"),
    [
        (0, 0, 0),
        (3, 10, 7),
        (MAX_SEQ - 2, 3, 5),
        (MAX_SEQ - 1, 0, 1),
        (0, MAX_SEQ - 1, MAX_SEQ - 1),
        (10, 3, MAX_SEQ - 7),
    ],
)
def test_distance_examples(older: int, newer: int, expected: int) -> None:
    assert distance(older, newer) == expected


@pytest.mark.parametrize(
    ("value", "reference", "expected"),
    [
        (5, 5, False),
        (4, 5, True),
        (5, 4, False),
        (MAX_SEQ - 1, 0, True),  # just before the wrap is behind 0
        (0, MAX_SEQ - 1, False),
        (MAX_SEQ - 3, 2, True),
        (0, HALF_RANGE - 1, True),
        (0, HALF_RANGE, False),  # exactly half the range away is not "behind"
        (0, HALF_RANGE + 1, False),
    ],
)
def test_is_behind_examples(value: int, reference: int, expected: bool) -> None:
    assert is_behind(value, reference) is expected


@given(any_counter, steps)
def test_seq_add_stays_in_range(a: int, n: int) -> None:
    assert 0 <= seq_add(a, n) < MAX_SEQ


@given(any_counter, steps)
def test_distance_inverts_seq_add(a: int, n: int) -> None:
    assert distance(a, seq_add(a, n)) == n % MAX_SEQ


@given(any_counter, any_counter)
def test_seq_add_inverts_distance(a: int, b: int) -> None:
    assert seq_add(a, distance(a, b)) == b


@given(any_counter, any_counter)
def test_distance_is_in_range_and_antisymmetric(a: int, b: int) -> None:
    d = distance(a, b)
    assert 0 <= d < MAX_SEQ
    assert (d + distance(b, a)) % MAX_SEQ == 0
    assert (d == 0) == (a == b)


@given(any_counter, st.integers(min_value=0, max_value=MAX_SEQ - 1), steps)
def test_distance_is_shift_invariant(a: int, d: int, shift: int) -> None:
    b = seq_add(a, d)
    assert distance(seq_add(a, shift), seq_add(b, shift)) == d


@given(any_counter, st.integers(min_value=1, max_value=HALF_RANGE - 1))
def test_is_behind_a_short_way_back(a: int, n: int) -> None:
    ahead = seq_add(a, n)
    assert is_behind(a, ahead)
    assert not is_behind(ahead, a)


@given(any_counter)
def test_nothing_is_behind_itself(a: int) -> None:
    assert not is_behind(a, a)


@given(any_counter, any_counter)
def test_is_behind_is_asymmetric(a: int, b: int) -> None:
    assert not (is_behind(a, b) and is_behind(b, a))
