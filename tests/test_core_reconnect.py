"""Reconnect backoff and the choice of address (core/reconnect.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_sm_tracker.core.reconnect import backoff_delay, choose_address


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    delays = [backoff_delay(attempt, 0.5, 30.0) for attempt in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


@given(st.integers(min_value=0, max_value=10**6), st.floats(0.0, 10.0), st.floats(0.0, 600.0))
def test_backoff_never_exceeds_the_cap_nor_overflows(attempt: int, base: float, cap: float) -> None:
    assert 0.0 <= backoff_delay(attempt, base, cap) <= cap


def test_a_negative_attempt_is_a_bug() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, 0.5, 30.0)


APP = ("example.org", 5222)
LOCATION = ("node2.example.org", 5223)


def test_the_servers_location_first_then_the_apps_address() -> None:
    assert choose_address(LOCATION, None, APP) == LOCATION
    assert choose_address(None, None, APP) == APP


def test_a_location_that_did_not_answer_is_not_tried_again() -> None:
    assert choose_address(LOCATION, LOCATION, APP) == APP
    assert choose_address(LOCATION, LOCATION, None) is None  # the app's DNS lookup
    assert choose_address(LOCATION, ("other", 1), APP) == LOCATION
