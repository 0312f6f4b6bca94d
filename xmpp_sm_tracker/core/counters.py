"""Sequence arithmetic modulo 2**32, as XEP-0198 requires for ``h`` and our ``seq``.

Every comparison of counters goes through :func:`distance`, so the wrap from
2**32 - 1 back to 0 is never a special case anywhere else.
"""

from __future__ import annotations

__all__ = ["HALF_RANGE", "MAX_SEQ", "distance", "is_behind", "seq_add"]

#: Counters live in [0, MAX_SEQ); XEP-0198 §4: "h SHALL be reset from 2^32-1 back to zero".
MAX_SEQ = 2**32
#: A counter that is less than half the range behind another one is "behind" it.
HALF_RANGE = 2**31


def seq_add(seq: int, n: int = 1) -> int:
    """``seq + n`` wrapped into the counter range."""
    return (seq + n) % MAX_SEQ


def distance(older: int, newer: int) -> int:
    """How many steps forward ``newer`` is from ``older``, modulo 2**32."""
    return (newer - older) % MAX_SEQ


def is_behind(value: int, reference: int) -> bool:
    """True when ``value`` lies strictly behind ``reference`` (by less than half the range)."""
    back = distance(value, reference)
    return 0 < back < HALF_RANGE
