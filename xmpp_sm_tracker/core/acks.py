"""When to ask the server for an ack, and when its silence means the link is dead.

slixmpp asks only every 5 stanzas, writes ``<r/>`` before the stanza that fills the
window and has no timer, so the last message of a burst is never acked. This clock
asks after ``every`` counted stanzas and after the last stanza of a burst (nothing
else waits to be written: a lone message is acked one round trip later, a burst costs
one ``<r/>`` per ``every`` stanzas and one at its end), at the latest ``delay``
seconds after the first stanza nobody asked about yet, and declares the link dead
when an ``<r/>`` stays unanswered for ``timeout`` seconds. With ``keepalive``, it
also asks when the server has said nothing for that long, so a link that died while
idle is found before the next message is written into it. Times are plain floats
from the caller's clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["AckClock", "AckPolicy"]


@dataclass(frozen=True, slots=True)
class AckPolicy:
    """How eagerly to ask for acks, and how long to wait for one."""

    every: int = 10
    delay: float = 0.2
    timeout: float = 15.0
    keepalive: float | None = None
    #: Ask after the last stanza of a burst too, not only after ``every`` or ``delay``.
    at_burst_end: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("ack policy: 'every' must be at least 1")
        if self.delay < 0 or self.timeout <= 0:
            raise ValueError("ack policy: 'delay' must be >= 0 and 'timeout' > 0")
        if self.keepalive is not None and not self.keepalive > 0:
            raise ValueError("ack policy: 'keepalive' must be None or > 0 seconds")
        if not isinstance(self.at_burst_end, bool):
            raise ValueError("ack policy: 'at_burst_end' must be True or False")


class AckClock:
    """Sans-I/O scheduling of ``<r/>`` requests and of the ack timeout."""

    __slots__ = (
        "_asked_at",
        "_first_unasked_at",
        "_last_heard",
        "_outstanding",
        "_unasked",
        "_waiting_since",
        "policy",
    )

    def __init__(self, policy: AckPolicy | None = None) -> None:
        self.policy = policy or AckPolicy()
        self._unasked = 0
        self._first_unasked_at: float | None = None
        self._outstanding = 0
        self._waiting_since: float | None = None
        self._last_heard: float | None = None
        #: When each unanswered ``<r/>`` went out, oldest first (the server answers in order).
        self._asked_at: deque[float] = deque(maxlen=64)

    def reset(self) -> None:
        """Forget everything (a new connection)."""
        self._unasked = 0
        self._first_unasked_at = None
        self._outstanding = 0
        self._waiting_since = None
        self._last_heard = None
        self._asked_at.clear()

    @property
    def unasked(self) -> int:
        """Stanzas counted since the last ``<r/>``."""
        return self._unasked

    def heard(self, now: float) -> None:
        """The server sent something (a stanza, an ``<a/>``): the link is alive."""
        self._last_heard = now

    def counted(self, now: float, *, last: bool = False, stanzas: int = 1) -> bool:
        """A stanza (or ``stanzas`` of them) was counted; True means "write an ``<r/>``
        after it now".

        ``last``: nothing else waits to be written after it (the end of a burst)."""
        self._unasked += stanzas
        if self._first_unasked_at is None:
            self._first_unasked_at = now
        policy = self.policy
        return self._unasked >= policy.every or (last and policy.at_burst_end)

    def request_sent(self, now: float) -> None:
        """An ``<r/>`` went out: the stanzas counted so far are asked about."""
        self._unasked = 0
        self._first_unasked_at = None
        self._outstanding += 1
        self._asked_at.append(now)
        if self._waiting_since is None:
            self._waiting_since = now

    def ack_received(self, now: float, *, news: bool = True) -> float | None:
        """An ``<a/>`` came in: one request is answered. Returns the round trip since
        that ``<r/>`` went out (None for an unasked ``<a/>``).

        An ``<a/>`` that is no ``news`` (``h`` did not move while stanzas wait) is no
        proof of life: the wait for one that moves goes on, and times out."""
        self._last_heard = now
        self._outstanding = max(0, self._outstanding - 1)
        if news:
            self._waiting_since = now if self._outstanding else None
        elif self._waiting_since is None:
            self._waiting_since = now
        return now - self._asked_at.popleft() if self._asked_at else None

    def request_due(self, now: float) -> bool:
        """True when stanzas have waited ``delay`` seconds without an ``<r/>``."""
        first = self._first_unasked_at
        return first is not None and now - first >= self.policy.delay

    def keepalive_due(self, now: float) -> bool:
        """True when the server has been silent for ``keepalive`` seconds and nothing
        is asked yet: time for an ``<r/>`` that proves the link, or times out."""
        deadline = self._keepalive_deadline()
        return deadline is not None and now >= deadline

    def _keepalive_deadline(self) -> float | None:
        keepalive, heard = self.policy.keepalive, self._last_heard
        if keepalive is None or heard is None or self._outstanding:
            return None
        return heard + keepalive

    def link_dead(self, now: float) -> bool:
        """True when an ``<r/>`` has gone unanswered for longer than ``timeout``."""
        since = self._waiting_since
        return since is not None and now - since >= self.policy.timeout

    def next_deadline(self) -> float | None:
        """The next time :meth:`request_due`, :meth:`keepalive_due` or :meth:`link_dead`
        may turn true."""
        # Plain comparisons: this runs for every counted stanza.
        first, since = self._first_unasked_at, self._waiting_since
        deadline = None if first is None else first + self.policy.delay
        if since is not None:
            timeout = since + self.policy.timeout
            deadline = timeout if deadline is None or timeout < deadline else deadline
        keepalive = self._keepalive_deadline()
        if keepalive is not None and (deadline is None or keepalive < deadline):
            deadline = keepalive
        return deadline
