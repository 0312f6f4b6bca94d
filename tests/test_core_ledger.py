"""The ledger of counted stanzas: what h acks, what <resumed h> resends, what <failed h> fails."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_sm_tracker.core.counters import MAX_SEQ, distance, seq_add
from xmpp_sm_tracker.core.ledger import (
    Entry,
    HBackwards,
    HTooHigh,
    Ledger,
    ResumeResult,
    SMProtocolError,
)

#: Starting counters, biased towards the wrap at 2**32.
starts = st.one_of(
    st.integers(min_value=0, max_value=MAX_SEQ - 1),
    st.integers(min_value=MAX_SEQ - 40, max_value=MAX_SEQ - 1),
    st.just(0),
)
counts = st.integers(min_value=0, max_value=40)


def filled(start: int, n: int) -> Ledger[str]:
    """A ledger that has counted ``n`` stanzas "p0".."p{n-1}" after ``start``, nothing acked."""
    ledger: Ledger[str] = Ledger(seq=start, last_ack=start)
    for i in range(n):
        ledger.record(f"p{i}", f"m{i}" if i % 2 == 0 else None)
    return ledger


def snapshot(ledger: Ledger[str]) -> list[tuple[int, str, str | None]]:
    return [(e.seq, e.payload, e.message_id) for e in ledger]


def payloads(entries: list[Entry[str]]) -> list[str]:
    return [e.payload for e in entries]


# ---------------------------------------------------------------- basics


def test_record_numbers_from_one_after_seq() -> None:
    ledger: Ledger[str] = Ledger()
    a = ledger.record("a", "id-a")
    b = ledger.record("b")
    assert (a.seq, a.payload, a.message_id) == (1, "a", "id-a")
    assert (b.seq, b.message_id) == (2, None)
    assert ledger.seq == 2
    assert ledger.last_ack == 0
    assert len(ledger) == 2
    assert ledger.in_flight == 2
    assert list(ledger) == [a, b]


def test_record_wraps_at_2_32() -> None:
    ledger: Ledger[str] = Ledger(seq=MAX_SEQ - 2, last_ack=MAX_SEQ - 2)
    seqs = [ledger.record(p).seq for p in "abcd"]
    assert seqs == [MAX_SEQ - 1, 0, 1, 2]
    assert ledger.in_flight == 4
    assert payloads(ledger.ack(0)) == ["a", "b"]
    assert ledger.last_ack == 0
    assert payloads(ledger.ack(2)) == ["c", "d"]
    assert ledger.in_flight == 0


def test_ack_examples() -> None:
    ledger = filled(0, 5)
    assert payloads(ledger.ack(2)) == ["p0", "p1"]
    assert ledger.last_ack == 2
    assert ledger.ack(2) == []
    assert payloads(ledger.ack(5)) == ["p2", "p3", "p4"]
    assert len(ledger) == 0
    assert ledger.in_flight == 0


def test_reset_returns_leftovers_and_counts_from_zero() -> None:
    ledger = filled(100, 3)
    ledger.ack(101)
    left = ledger.reset()
    assert payloads(left) == ["p1", "p2"]
    assert (ledger.seq, ledger.last_ack, len(ledger)) == (0, 0, 0)
    assert ledger.record("x").seq == 1


def test_drain_empties_but_keeps_the_counter() -> None:
    ledger = filled(7, 3)
    left = ledger.drain()
    assert payloads(left) == ["p0", "p1", "p2"]
    assert (ledger.seq, ledger.last_ack, len(ledger)) == (10, 10, 0)
    assert ledger.in_flight == 0
    assert ledger.drain() == []
    assert ledger.record("next").seq == 11


def test_errors_carry_the_counters() -> None:
    ledger = filled(10, 2)
    with pytest.raises(HTooHigh) as too_high:
        ledger.ack(13)
    assert (too_high.value.h, too_high.value.last_ack, too_high.value.seq) == (13, 10, 12)
    ledger.ack(11)
    with pytest.raises(HBackwards) as backwards:
        ledger.ack(10)
    assert (backwards.value.h, backwards.value.last_ack, backwards.value.seq) == (10, 11, 12)
    assert isinstance(too_high.value, SMProtocolError)
    assert isinstance(backwards.value, SMProtocolError)


def test_backwards_across_the_wrap() -> None:
    ledger = filled(MAX_SEQ - 2, 4)
    ledger.ack(1)  # wrapped
    with pytest.raises(HBackwards):
        ledger.ack(MAX_SEQ - 1)
    with pytest.raises(HTooHigh):
        ledger.ack(3)
    assert payloads(list(ledger)) == ["p3"]


def test_check_accepts_exactly_the_range_last_ack_to_seq() -> None:
    ledger = filled(5, 3)
    for h in (5, 6, 7, 8):
        ledger.check(h)
    with pytest.raises(HTooHigh):
        ledger.check(9)
    with pytest.raises(HBackwards):
        ledger.check(4)


# ---------------------------------------------------------------- properties: ack


@st.composite
def acking_plan(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(start, n, increasing cut points in 1..n ending at n): a chunking of the acks."""
    start = draw(starts)
    n = draw(counts)
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(n, 1)), max_size=n)))
    if n and (not cuts or cuts[-1] != n):
        cuts.append(n)
    if not n:
        cuts = []
    return start, n, cuts


@given(acking_plan(), st.booleans())
def test_any_chunking_acks_every_entry_once_in_order(
    plan: tuple[int, int, list[int]], repeat_last: bool
) -> None:
    start, n, cuts = plan
    ledger = filled(start, n)
    expected = snapshot(ledger)
    acked: list[Entry[str]] = []
    for cut in cuts:
        h = seq_add(start, cut)
        acked += ledger.ack(h)
        assert ledger.last_ack == h
        assert ledger.in_flight == n - cut
        assert len(ledger) == n - cut
        if repeat_last:
            assert ledger.ack(h) == []  # a repeated h acks nothing
    assert [(e.seq, e.payload, e.message_id) for e in acked] == expected
    assert len(ledger) == 0
    assert ledger.in_flight == 0
    assert ledger.seq == seq_add(start, n)


@given(starts, counts, st.integers(min_value=1, max_value=2**31 - 50))
def test_h_beyond_what_was_sent_raises_and_loses_nothing(start: int, n: int, extra: int) -> None:
    ledger = filled(start, n)
    before = snapshot(ledger)
    h = seq_add(start, n + extra)
    with pytest.raises(HTooHigh):
        ledger.ack(h)
    assert snapshot(ledger) == before
    assert (ledger.seq, ledger.last_ack) == (seq_add(start, n), start)
    # The ledger still works afterwards.
    assert len(ledger.ack(seq_add(start, n))) == n


@given(
    starts,
    st.integers(min_value=1, max_value=40),
    st.data(),
)
def test_h_going_backwards_raises_and_loses_nothing(
    start: int, n: int, data: st.DataObject
) -> None:
    ledger = filled(start, n)
    first = data.draw(st.integers(min_value=1, max_value=n), label="first ack")
    ledger.ack(seq_add(start, first))
    before = snapshot(ledger)
    back = data.draw(st.integers(min_value=1, max_value=first + 1000), label="steps back")
    with pytest.raises(HBackwards):
        ledger.ack(seq_add(start, first - back))
    assert snapshot(ledger) == before
    assert ledger.last_ack == seq_add(start, first)


@given(starts, counts)
def test_ack_of_last_ack_acks_nothing(start: int, n: int) -> None:
    ledger = filled(start, n)
    before = snapshot(ledger)
    assert ledger.ack(start) == []
    assert snapshot(ledger) == before
    assert ledger.last_ack == start


# ---------------------------------------------------------------- properties: resume


@given(starts, counts, st.data())
def test_resume_acks_what_h_covers_and_renumbers_the_rest(
    start: int, n: int, data: st.DataObject
) -> None:
    ledger = filled(start, n)
    pre_acked = data.draw(st.integers(min_value=0, max_value=n), label="acked before the drop")
    ledger.ack(seq_add(start, pre_acked))
    covered = data.draw(st.integers(min_value=pre_acked, max_value=n), label="<resumed h>")
    h = seq_add(start, covered)
    expected = snapshot(ledger)

    result = ledger.resume(h)

    assert isinstance(result, ResumeResult)
    assert [(e.seq, e.payload, e.message_id) for e in result.acked] == expected[
        : covered - pre_acked
    ]
    assert payloads(result.resend) == [p for _, p, _ in expected[covered - pre_acked :]]
    assert [e.seq for e in result.resend] == [seq_add(h, i) for i in range(1, n - covered + 1)]
    assert result.missing == 0
    assert ledger.seq == seq_add(h, len(result.resend))
    assert ledger.last_ack == h
    assert list(ledger) == result.resend  # still unacked until the server acks the resends
    if result.resend:
        assert payloads(ledger.ack(ledger.seq)) == payloads(result.resend)


@given(starts, counts, st.integers(min_value=1, max_value=1000))
def test_resume_with_bad_h_raises_and_loses_nothing(start: int, n: int, extra: int) -> None:
    ledger = filled(start, n)
    before = snapshot(ledger)
    with pytest.raises(HTooHigh):
        ledger.resume(seq_add(start, n + extra))
    assert snapshot(ledger) == before
    assert (ledger.seq, ledger.last_ack) == (seq_add(start, n), start)


@st.composite
def gapped_ledger(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(last_ack, seq distance, the offsets in 1..distance that have an entry)."""
    last_ack = draw(starts)
    span = draw(st.integers(min_value=0, max_value=30))
    offsets = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(span, 1)))))
    return last_ack, span, [o for o in offsets if o <= span]


@given(gapped_ledger(), st.data())
def test_restored_ledger_with_gaps_reports_missing(
    plan: tuple[int, int, list[int]], data: st.DataObject
) -> None:
    last_ack, span, offsets = plan
    ledger: Ledger[str] = Ledger(seq=seq_add(last_ack, span), last_ack=last_ack)
    for o in offsets:
        ledger.restore(Entry(seq_add(last_ack, o), f"p{o}", f"m{o}"))
    covered = data.draw(st.integers(min_value=0, max_value=span), label="<resumed h>")
    h = seq_add(last_ack, covered)

    result = ledger.resume(h)

    assert payloads(result.acked) == [f"p{o}" for o in offsets if o <= covered]
    assert payloads(result.resend) == [f"p{o}" for o in offsets if o > covered]
    unhandled = span - covered
    assert result.missing == unhandled - len(result.resend)
    assert result.missing >= 0
    assert [e.seq for e in result.resend] == [
        seq_add(h, i) for i in range(1, len(result.resend) + 1)
    ]
    assert ledger.seq == seq_add(h, len(result.resend))
    assert ledger.in_flight == len(result.resend)


def test_restored_ledger_shorter_than_resumed_h_implies() -> None:
    # We sent 10..15 but the saved queue only kept 12 and 15.
    ledger: Ledger[str] = Ledger(seq=15, last_ack=10)
    ledger.restore(Entry(12, "twelve", "m12"))
    ledger.restore(Entry(15, "fifteen", "m15"))
    result = ledger.resume(11)
    assert result.acked == []
    assert [(e.seq, e.payload) for e in result.resend] == [(12, "twelve"), (13, "fifteen")]
    assert result.missing == 2  # 13 and 14 were never saved
    assert ledger.seq == 13


# ---------------------------------------------------------------- properties: fail


@given(starts, counts, st.data())
def test_fail_acks_what_h_covers_and_fails_the_rest(
    start: int, n: int, data: st.DataObject
) -> None:
    ledger = filled(start, n)
    covered = data.draw(st.integers(min_value=0, max_value=n), label="<failed h>")
    expected = snapshot(ledger)
    acked, failed = ledger.fail(seq_add(start, covered))
    assert [(e.seq, e.payload, e.message_id) for e in acked] == expected[:covered]
    assert [(e.seq, e.payload, e.message_id) for e in failed] == expected[covered:]
    assert len(ledger) == 0
    assert ledger.in_flight == 0


@given(starts, counts, st.one_of(st.none(), st.integers(min_value=1, max_value=1000)))
def test_fail_without_usable_h_fails_everything(start: int, n: int, extra: int | None) -> None:
    ledger = filled(start, n)
    ledger.ack(start)
    expected = snapshot(ledger)
    h = None if extra is None else seq_add(start, n + extra)
    acked, failed = ledger.fail(h)
    assert acked == []
    assert [(e.seq, e.payload, e.message_id) for e in failed] == expected
    assert len(ledger) == 0


def test_fail_with_backwards_h_fails_everything() -> None:
    ledger = filled(20, 4)
    ledger.ack(22)
    acked, failed = ledger.fail(21)
    assert acked == []
    assert payloads(failed) == ["p2", "p3"]


@given(starts, counts)
def test_entries_are_never_lost_or_duplicated(start: int, n: int) -> None:
    # Whatever ack/resume/fail sequence, each entry comes out exactly once.
    ledger = filled(start, n)
    seen: list[str] = []
    half = n // 2
    seen += payloads(ledger.ack(seq_add(start, half // 2)))
    result = ledger.resume(seq_add(start, half))
    seen += payloads(result.acked)
    acked, failed = ledger.fail(seq_add(ledger.last_ack, len(result.resend) // 2))
    seen += payloads(acked) + payloads(failed)
    assert seen == [f"p{i}" for i in range(n)]
    assert distance(ledger.last_ack, ledger.seq) == 0
