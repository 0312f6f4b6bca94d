"""When a failed message is worth sending again, and when to give up.

Automatic retry is off by default (old messages should not reappear unasked); a
``RetryPolicy`` turns it on. Only failures that nobody refused are retried:
resumption failures, ended sessions, ack timeouts and ``wait`` bounces. A
``cancel`` / ``modify`` / ``auth`` bounce is an answer, and is never retried.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import TrackedMessage

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to ``max_attempts`` sends in all, ``delay * backoff**n`` seconds apart.

    ``attempt_timeout``: a (re)sent message the server has not acked by then fails
    with ``reason="ack-timeout"`` (and is retried); None waits for the stream.
    """

    max_attempts: int = 3
    delay: float = 5.0
    backoff: float = 2.0
    max_delay: float = 300.0
    attempt_timeout: float | None = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy: max_attempts must be at least 1")
        if self.delay < 0 or self.backoff < 1 or self.max_delay < 0:
            raise ValueError("RetryPolicy: delay >= 0, backoff >= 1 and max_delay >= 0")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise ValueError("RetryPolicy: attempt_timeout must be positive or None")

    def should_retry(self, record: TrackedMessage) -> bool:
        """True when the failure is retryable and attempts are left."""
        return record.retryable and record.attempts < self.max_attempts

    def exhausted(self, record: TrackedMessage) -> bool:
        """True when a retryable failure has used up every attempt."""
        return record.retryable and record.attempts >= self.max_attempts

    def delay_before(self, record: TrackedMessage) -> float:
        """Seconds to wait before the next attempt of ``record``."""
        return min(self.max_delay, self.delay * self.backoff ** max(0, record.attempts - 1))
