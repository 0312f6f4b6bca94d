"""Time-ordered stanza ids (UUID version 7): their shape, their order, and the plugin's use."""

from __future__ import annotations

import uuid

import pytest

from xmpp_sm_tracker.ids import TimeOrderedIds
from xmpp_sm_tracker.testing.client import make_client


def _as_uuid(value: str) -> uuid.UUID:
    assert len(value) == 32 and value == value.lower()
    return uuid.UUID(hex=value)


def test_an_id_is_a_version_7_uuid_of_the_millisecond_it_was_made() -> None:
    ids = TimeOrderedIds(clock_ns=lambda: 1_700_000_000_123_456_789)
    made = _as_uuid(ids())
    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert made.int >> 80 == 1_700_000_000_123  # the 48-bit time in milliseconds


def test_ids_made_in_one_millisecond_keep_their_order_and_differ() -> None:
    ids = TimeOrderedIds(clock_ns=lambda: 5_000_000)
    made = [ids() for _ in range(4096)]
    assert made == sorted(made)
    assert len(set(made)) == 4096
    assert {_as_uuid(m).int >> 80 for m in made} == {5}  # one millisecond: the counter


def test_the_4097th_id_of_a_millisecond_borrows_the_next_one() -> None:
    ids = TimeOrderedIds(clock_ns=lambda: 5_000_000)
    made = [ids() for _ in range(4097)]
    assert made == sorted(made)
    assert _as_uuid(made[-1]).int >> 80 == 6
    assert (_as_uuid(made[-1]).int >> 64) & 0xFFF == 0  # its counter starts again


def test_a_clock_that_steps_back_does_not_break_the_order() -> None:
    times = iter([9_000_000_000, 4_000_000_000, 4_000_000_000, 9_500_000_000])
    ids = TimeOrderedIds(clock_ns=lambda: next(times))
    made = [ids() for _ in range(4)]
    assert made == sorted(made)
    assert [_as_uuid(m).int >> 80 for m in made] == [9000, 9000, 9000, 9500]


def test_the_random_part_is_not_shared_between_ids() -> None:
    ids = TimeOrderedIds(clock_ns=lambda: 0)
    random_parts = {_as_uuid(ids()).int & (2**62 - 1) for _ in range(2000)}
    assert len(random_parts) == 2000


def test_ids_from_the_real_clock_sort_in_the_order_they_were_made() -> None:
    ids = TimeOrderedIds()
    made = [ids() for _ in range(20_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_the_plugin_gives_stanzas_time_ordered_ids_and_gives_slixmpps_back_at_the_end() -> None:
    xmpp = make_client("alice@localhost/ids", "pass")
    made = [xmpp.make_message(mto="bob@localhost", mbody=str(i))["id"] for i in range(100)]
    assert all(_as_uuid(m).version == 7 for m in made)
    assert made == sorted(made)
    assert _as_uuid(xmpp.make_iq_get()["id"]).version == 7
    xmpp.plugin.disable("sm_tracker")
    assert _as_uuid(xmpp.make_message(mto="bob@localhost", mbody="x")["id"]).version == 4


def test_time_ordered_ids_can_be_turned_off() -> None:
    xmpp = make_client("alice@localhost/ids", "pass", tracker_config={"time_ordered_ids": False})
    assert _as_uuid(xmpp.make_message(mto="bob@localhost", mbody="x")["id"]).version == 4


@pytest.mark.parametrize("time_ordered", [True, False])
async def test_a_message_sent_without_an_id_is_tracked_under_one_of_the_same_kind(
    time_ordered: bool,
) -> None:
    xmpp = make_client(
        "alice@localhost/ids", "pass", tracker_config={"time_ordered_ids": time_ordered}
    )
    message = xmpp.make_message(mto="bob@localhost", mbody="no id")
    del message["id"]
    message.send()  # offline: tracked and parked for the session
    (record,) = xmpp.plugin["sm_tracker"].core.records.values()
    assert _as_uuid(record.id).version == (7 if time_ordered else 4)
    assert f'id="{record.id}"' in str(message)
