"""``tracker.stats()``: what a service watches, cheap enough to read every second."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["StatsCounters", "TrackerStats"]

#: Ack round trips kept for the percentiles (the latest ones).
RTT_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class TrackerStats:
    """A snapshot of the tracker since this process started it."""

    #: How many times messages reached each state (``"sent"``, ``"acked"``, ...).
    reached: Mapping[str, int]
    #: Messages in flight now (sent, hibernated or resent, not yet settled).
    in_flight: int
    #: Seconds since the oldest message still in flight was created (None: none).
    oldest_in_flight_age: float | None
    #: ``<r/>`` to ``<a/>`` round trips in seconds over the latest ones:
    #: ``{"p50", "p90", "p99", "max"}`` (empty before the first answer).
    ack_rtt: Mapping[str, float]
    #: Connections after the first one (automatic reconnects and the app's own).
    reconnects: int
    #: Resumptions the server accepted / refused.
    resumptions: int
    resumptions_failed: int


class StatsCounters:
    """The plugin's running counts; the core keeps its own (resumptions)."""

    __slots__ = ("connections", "reached", "rtts")

    def __init__(self) -> None:
        self.reached: Counter[str] = Counter()
        self.rtts: deque[float] = deque(maxlen=RTT_WINDOW)
        self.connections = 0

    def rtt_percentiles(self) -> dict[str, float]:
        if not self.rtts:
            return {}
        ordered = sorted(self.rtts)
        last = len(ordered) - 1

        def at(q: float) -> float:
            return ordered[min(last, math.ceil(q * len(ordered)) - 1)]

        return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}
