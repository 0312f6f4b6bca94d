"""The ledger of stanzas sent on a managed stream, by XEP-0198 sequence number.

It answers the questions the protocol asks: what does ``h`` acknowledge, what is
still unacked, what must be resent after ``<resumed h>``, and what ``<failed h>``
acknowledges before failing the rest. Entries carry an explicit ``seq`` so a
ledger restored from a state that lost some entries is still answered correctly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .counters import distance, is_behind, seq_add

__all__ = [
    "Entry",
    "HBackwards",
    "HTooHigh",
    "Ledger",
    "ResumeResult",
    "SMProtocolError",
]

P = TypeVar("P")


class SMProtocolError(Exception):
    """The server's counter contradicts what we sent (XEP-0198 §4 "h too high")."""

    def __init__(self, message: str, h: int, last_ack: int, seq: int) -> None:
        super().__init__(message)
        self.h = h
        self.last_ack = last_ack
        self.seq = seq


class HTooHigh(SMProtocolError):
    """``h`` acknowledges stanzas we never sent."""


class HBackwards(SMProtocolError):
    """``h`` is behind an ``h`` the server already gave us."""


@dataclass(slots=True)
class Entry(Generic[P]):
    """One counted stanza: its number on the stream and what the caller keeps for it."""

    seq: int
    payload: P
    message_id: str | None = None
    #: The payload as text, once somebody needed it (saved states reuse it).
    serialized: str | None = None


@dataclass(slots=True)
class ResumeResult(Generic[P]):
    """What ``<resumed h>`` means for the ledger."""

    acked: list[Entry[P]]
    resend: list[Entry[P]]
    #: Stanzas the server never handled that we have no entry for (a restored state
    #: that lost part of its queue): they cannot be resent.
    missing: int
    #: Stanzas the server handled that a restored state did not know about.
    ahead: int = 0


class Ledger(Generic[P]):
    """Unacked stanzas of one managed stream, in the order they were sent."""

    __slots__ = ("_unacked", "_withdrawn", "last_ack", "seq")

    def __init__(self, seq: int = 0, last_ack: int = 0) -> None:
        #: Number of the last stanza we counted (XEP-0198's outbound counter).
        self.seq = seq
        #: The last ``h`` the server gave us.
        self.last_ack = last_ack
        self._unacked: deque[Entry[P]] = deque()
        #: Entries taken out on purpose since the last ack (never to be resent).
        self._withdrawn = 0

    def __len__(self) -> int:
        return len(self._unacked)

    def __iter__(self) -> Iterator[Entry[P]]:
        return iter(self._unacked)

    @property
    def in_flight(self) -> int:
        """How many stanzas the server has not acknowledged (entries or not)."""
        return distance(self.last_ack, self.seq)

    @property
    def newest(self) -> Entry[P] | None:
        """The stanza counted last, if it is still unacked."""
        return self._unacked[-1] if self._unacked else None

    def reset(self) -> list[Entry[P]]:
        """Start counting afresh (``<enable/>`` sent); returns what was left unresolved."""
        left = self.drain()
        self.seq = 0
        self.last_ack = 0
        return left

    def record(self, payload: P, message_id: str | None = None) -> Entry[P]:
        """Count one stanza that is about to be written."""
        self.seq = seq_add(self.seq)
        entry = Entry(self.seq, payload, message_id)
        self._unacked.append(entry)
        return entry

    def withdraw(self, entry: Entry[P]) -> None:
        """Take out a stanza the server refused to read (it closed the stream on it):
        a resumption must not resend it. The counter keeps its place: the server's
        ``h`` stops before it, and ``resume`` renumbers what follows."""
        self._unacked.remove(entry)
        self._withdrawn += 1

    def restore(self, entry: Entry[P]) -> None:
        """Put back an entry from a saved state (must come in sequence order)."""
        self._unacked.append(entry)

    def check(self, h: int) -> None:
        """Raise when ``h`` goes backwards or beyond what we sent."""
        if distance(self.last_ack, h) <= self.in_flight:
            return
        if is_behind(h, self.last_ack):
            raise HBackwards(
                f"h={h} goes backwards from the last ack {self.last_ack}",
                h,
                self.last_ack,
                self.seq,
            )
        raise HTooHigh(
            f"h={h} acknowledges more than we sent (last ack {self.last_ack}, sent {self.seq})",
            h,
            self.last_ack,
            self.seq,
        )

    def ack(self, h: int) -> list[Entry[P]]:
        """Pop every entry ``h`` covers; raises :class:`SMProtocolError` on a bad ``h``."""
        self.check(h)
        covered = distance(self.last_ack, h)
        acked: list[Entry[P]] = []
        unacked = self._unacked
        while unacked and distance(self.last_ack, unacked[0].seq) <= covered:
            acked.append(unacked.popleft())
        self.last_ack = h
        return acked

    def resume(self, h: int, *, allow_ahead: bool = False) -> ResumeResult[P]:
        """Apply ``<resumed h>``: ack what it covers, renumber the rest for resending.

        The server numbers the resent stanzas h+1, h+2, ...; renumbering keeps our
        counter equal to the server's even when a restored ledger had gaps.
        ``allow_ahead`` accepts an ``h`` beyond our counter, for a state saved before
        the last stanzas of a crashed process were counted: those are unknown to us.
        """
        ahead = 0
        if allow_ahead and not is_behind(h, self.seq):
            ahead = distance(self.seq, h)
            self.seq = h
        acked = self.ack(h)
        missing = self.in_flight - len(self._unacked) - self._withdrawn
        self._withdrawn = 0
        resend = list(self._unacked)
        for offset, entry in enumerate(resend, start=1):
            entry.seq = seq_add(h, offset)
        self.seq = seq_add(h, len(resend))
        return ResumeResult(acked, resend, missing, ahead)

    def fail(self, h: int | None) -> tuple[list[Entry[P]], list[Entry[P]]]:
        """Apply ``<failed h>``: (entries ``h`` acknowledges, entries that failed).

        A bad or absent ``h`` acknowledges nothing: every entry fails, none is lost.
        """
        acked: list[Entry[P]] = []
        if h is not None:
            try:
                acked = self.ack(h)
            except SMProtocolError:
                acked = []
        return acked, self.drain()

    def drain(self) -> list[Entry[P]]:
        """Remove and return every unacked entry."""
        left = list(self._unacked)
        self._unacked.clear()
        self._withdrawn = 0
        self.last_ack = self.seq
        return left
