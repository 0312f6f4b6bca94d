"""The outbox's verdicts and holds (core/outbox.py)."""

from __future__ import annotations

from xmpp_sm_tracker.core.outbox import Outbox, Verdict


class Copy:
    """A stanza object: copies are told apart by identity, as in the plugin."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Copy({self.name})"


def test_untracked_stanzas_are_written_or_counted() -> None:
    box: Outbox[Copy] = Outbox()
    assert box.verdict(Copy("iq"), None) is Verdict.WRITE
    assert box.verdict(Copy("iq"), None, counting=True) is Verdict.COUNT
    assert box.empty


def test_anything_written_while_resuming_is_parked() -> None:
    # Smack #185: counted before the resends and again among them otherwise.
    box: Outbox[Copy] = Outbox()
    assert box.verdict(Copy("iq"), None, resuming=True, counting=True) is Verdict.PARK
    assert box.verdict(Copy("m"), "m", tracked=True, resuming=True, counting=True) is Verdict.PARK


def test_a_message_whose_link_dropped_in_the_queue_is_parked() -> None:
    box: Outbox[Copy] = Outbox()
    assert box.verdict(Copy("m"), "m", tracked=True, link_down=True, counting=True) is Verdict.PARK
    assert box.verdict(Copy("iq"), None, link_down=True, counting=True) is Verdict.COUNT


def test_a_withheld_message_is_dropped() -> None:
    box: Outbox[Copy] = Outbox()
    assert box.verdict(Copy("m"), "m", withheld=True, counting=True) is Verdict.DROP


def test_a_doomed_parked_copy_is_dropped_but_a_resent_copy_goes_out() -> None:
    box: Outbox[Copy] = Outbox()
    parked, resent = Copy("first"), Copy("again")
    box.parked("m", parked)
    assert box.is_waiting("m")
    box.doom("m")  # failed while parked
    assert not box.is_waiting("m")
    assert box.verdict(resent, "m", counting=True) is Verdict.COUNT  # explicit resend
    assert box.verdict(parked, "m", counting=True) is Verdict.DROP
    assert box.empty


def test_a_parked_copy_stops_waiting_when_written() -> None:
    box: Outbox[Copy] = Outbox()
    copy = Copy("m")
    box.parked("m", copy)
    assert box.waiting_ids() == {"m"}
    assert box.verdict(copy, "m", counting=True) is Verdict.COUNT
    assert box.empty


def test_room_messages_wait_for_the_rejoin_in_order() -> None:
    box: Outbox[Copy] = Outbox()
    first, second, other = Copy("1"), Copy("2"), Copy("3")
    waited = frozenset({"r@muc"})
    for copy in (first, second):
        verdict = box.verdict(
            copy, copy.name, tracked=True, room="r@muc", rooms_waited_for=waited, counting=True
        )
        assert verdict is Verdict.HOLD_FOR_ROOM
    verdict = box.verdict(
        other, "3", tracked=True, room="s@muc", rooms_waited_for=waited, counting=True
    )
    assert verdict is Verdict.COUNT
    assert box.held_rooms() == {"r@muc"} and box.waiting_ids() == {"1", "2"}
    released = box.release_room("r@muc")
    assert released == [first, second]
    for copy in released:  # written now: they stop waiting
        assert box.verdict(copy, copy.name, counting=True) is Verdict.COUNT
    assert box.empty


def test_leaving_a_room_drops_its_held_copies() -> None:
    box: Outbox[Copy] = Outbox()
    copy = Copy("1")
    box.verdict(copy, "1", tracked=True, room="r@muc", rooms_waited_for={"r@muc"}, counting=True)
    box.drop_room("r@muc")
    assert box.empty


def test_new_messages_wait_behind_a_resend_of_their_conversation() -> None:
    box: Outbox[Copy] = Outbox()
    assert not box.hold_behind_resend("bob@x", "before", Copy("before"))
    box.close_gates(["bob@x"])
    box.close_gates(["bob@x"])  # two resends overlap
    late1, late2 = Copy("a"), Copy("b")
    assert box.hold_behind_resend("bob@x", "a", late1)
    assert box.hold_behind_resend("bob@x", "b", late2)
    assert box.held_ids() == {"a", "b"}
    assert not box.hold_behind_resend("carol@x", "c", Copy("c"))
    assert box.open_gates(["bob@x"]) == []  # one resend still under way
    assert box.resending("bob@x")
    assert box.open_gates(["bob@x"]) == [late1, late2]
    assert box.empty


def test_take_all_hands_back_everything_but_doomed_copies() -> None:
    box: Outbox[Copy] = Outbox()
    held, doomed, behind = Copy("h"), Copy("d"), Copy("b")
    box.verdict(held, "h", tracked=True, room="r@muc", rooms_waited_for={"r@muc"})
    box.parked("d", doomed)
    box.doom("d")
    box.close_gates(["bob@x"])
    box.hold_behind_resend("bob@x", "b", behind)
    assert list(box.take_all()) == [held, behind]
    assert box.empty


def test_every_parked_copy_of_a_message_is_doomed() -> None:
    # A message resent while offline is parked twice; both copies must be caught when
    # it fails (one dict entry per id lost the older copy, which then went out).
    box: Outbox[Copy] = Outbox()
    first, again = Copy("first"), Copy("again")
    box.parked("m", first)
    box.parked("m", again)
    box.doom("m")
    assert box.verdict(again, "m", tracked=True, counting=True) is Verdict.DROP
    assert box.verdict(first, "m", tracked=True, counting=True) is Verdict.DROP
    assert box.empty


def test_a_session_start_hands_parked_copies_to_the_client_but_keeps_room_holds() -> None:
    # slixmpp moves what it parked into its send queue at the session start; if that
    # queue is purged with the session, those messages are unsent, not "parked".
    box: Outbox[Copy] = Outbox()
    parked, held = Copy("p"), Copy("h")
    box.parked("p", parked)
    box.verdict(held, "h", tracked=True, room="r@muc", rooms_waited_for={"r@muc"})
    box.session_started()
    assert box.waiting_ids() == {"h"}
    assert box.release_room("r@muc") == [held]


def test_a_doomed_copy_is_still_dropped_after_the_session_start_moved_it() -> None:
    # Found by the live suite: slixmpp re-queues what it parked at the next session
    # start; a failed message's copy must still be dropped when it surfaces there.
    box: Outbox[Copy] = Outbox()
    old = Copy("old")
    box.parked("m", old)
    box.doom("m")
    box.session_started()
    assert box.held_ids() == {"m"}  # the core keeps the id withheld meanwhile
    assert box.verdict(old, "m", tracked=True, counting=True) is Verdict.DROP
    assert box.empty


def test_doomed_copies_purged_with_the_send_queue_are_forgotten() -> None:
    box: Outbox[Copy] = Outbox()
    box.parked("m", Copy("old"))
    box.doom("m")
    box.session_started()
    box.session_ended()  # the queue (and the copy in it) is gone
    assert box.empty and box.held_ids() == frozenset()


def test_a_message_that_fails_while_held_behind_a_resend_is_held_no_more() -> None:
    # Found by the protocol model: a new message waited behind a resend of its
    # conversation and failed there (its attempt timed out, its session was closed).
    # doom() only looked at parked copies: the held copy stayed, the outbox kept a copy
    # of a failed message it was never going to write, and the core its withheld id.
    box: Outbox[Copy] = Outbox()
    box.close_gates(["bob@x"])
    first, failed, last = Copy("first"), Copy("failed"), Copy("last")
    for copy in (first, failed, last):
        assert box.hold_behind_resend("bob@x", copy.name, copy)
    box.doom("failed")
    assert box.held_ids() == {"first", "last"}
    assert box.open_gates(["bob@x"]) == [first, last]
    assert box.empty


def test_a_doomed_room_copy_is_not_held_behind_a_resend() -> None:
    # It goes to its verdict at once, which drops it: the outbox holds no copy of a
    # failed message behind a gate.
    box: Outbox[Copy] = Outbox()
    copy = Copy("n")
    box.verdict(copy, "n", tracked=True, room="r@muc", rooms_waited_for={"r@muc"})
    box.doom("n")
    box.close_gates(["r@muc"])
    [released] = box.release_room("r@muc")
    assert not box.hold_behind_resend("r@muc", "n", released)
    assert box.verdict(released, "n", tracked=True, counting=True) is Verdict.DROP
    assert box.open_gates(["r@muc"]) == []
    assert box.empty


def test_a_message_held_behind_a_resend_is_waiting_to_go_out() -> None:
    # Found by the protocol model: a new message held behind a resend (or a scheduled
    # retry) of its conversation when the session ended was failed "session-ended" as
    # if slixmpp had purged it (waiting_ids named parked and room-held copies only),
    # although its copy was still held here, to go out once the gate opens.
    box: Outbox[Copy] = Outbox()
    box.close_gates(["bob@x"])
    held = Copy("n")
    assert box.hold_behind_resend("bob@x", "n", held)
    assert box.is_waiting("n")
    assert box.waiting_ids() == {"n"}
    assert box.open_gates(["bob@x"]) == [held]
    assert not box.is_waiting("n")
    assert box.empty


def test_a_copy_its_room_releases_is_not_held_behind_a_resend() -> None:
    # Found by the protocol model's long profile: a message held for its room's rejoin
    # was released while a retry of an older message of the room was due, and went
    # behind that resend gate (Outbound._send_held asks), while a newer message to the
    # room, still in slixmpp's send queue when the gate closed, went out at once: newer
    # before older. (Earlier, a room's copies were taken ahead of the messages held
    # there, and a resend's copy could wait behind its own retry's gate for good.) A
    # copy a room held passed its gate when it was handed over, like the one still
    # queued: the gate is for messages handed over while it is closed.
    box: Outbox[Copy] = Outbox()
    room, waited = "r@muc", frozenset({"r@muc"})
    older, newer = Copy("older"), Copy("newer")
    verdict = box.verdict(older, "older", tracked=True, room=room, rooms_waited_for=waited)
    assert verdict is Verdict.HOLD_FOR_ROOM
    box.close_gates([room])  # a retry of an older message of the room is due
    assert box.hold_behind_resend(room, "newer", newer)  # sent now: it waits
    [released] = box.release_room(room)
    assert not box.hold_behind_resend(room, "older", released)  # out now
    assert box.verdict(released, "older", tracked=True, counting=True) is Verdict.COUNT
    assert box.open_gates([room]) == [newer]
    assert box.empty


def test_a_full_window_holds_new_stanzas_in_order_until_acks_make_room() -> None:
    # Issue 20: a server that leaves stanzas unacked must not make the ledger and the
    # saved state grow without bound; new stanzas wait, unwritten, nothing is dropped.
    box: Outbox[Copy] = Outbox()
    a, b, c = Copy("a"), Copy("b"), Copy("c")
    assert not box.hold_for_window("a", a, in_flight=2, limit=3)  # room: out at once
    assert box.hold_for_window("a", a, in_flight=3, limit=3)
    assert box.hold_for_window(None, b, in_flight=0, limit=3)  # behind a: order kept
    assert box.hold_for_window("c", c, in_flight=0, limit=3)
    assert box.window_held == 3 and box.waiting_ids() == {"a", "c"}
    assert box.is_waiting("c") and box.held_ids() == {"a", "c"}
    assert box.release_window(2) == [a, b]
    box.doom("c")  # it failed meanwhile: its held copy never goes out
    assert box.release_window(5) == [] and box.empty
    assert not box.hold_for_window("d", Copy("d"), in_flight=10**6, limit=None)  # no limit


def test_what_waits_for_the_window_goes_to_the_client_at_plugin_end() -> None:
    box: Outbox[Copy] = Outbox()
    held = Copy("held")
    assert box.hold_for_window("held", held, in_flight=9, limit=1)
    assert list(box.take_all()) == [held] and box.empty
