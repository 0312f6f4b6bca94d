"""xmpp_sm_tracker: per-message delivery tracking over XEP-0198 for slixmpp.

Load it with ``xmpp.register_plugin("sm_tracker", module="xmpp_sm_tracker")``
(or, once this package is imported, ``xmpp.register_plugin("sm_tracker")``).
"""

from .core.acks import AckPolicy
from .core.ledger import HBackwards, HTooHigh, SMProtocolError
from .core.phases import IllegalPhaseEvent, LinkPhase, SMPhase
from .core.records import FailureReason, TrackedMessage
from .core.retry import RetryPolicy
from .core.smstate import SMStateError
from .core.states import DeliveryState, IllegalTransition
from .handles import MessageFailed, MessageHandle, TrackerClosed
from .plugin import SMTracker, tracker_of
from .stats import TrackerStats
from .stores.base import AccountLeased, LeaseLost, SMState, StoreError, TrackerStore
from .stores.memory import MemoryStore
from .stores.sqlite import SQLiteDatabase, SQLiteStore

#: slixmpp's ``register_plugin(name, module=...)`` looks up ``getattr(module, name)``.
sm_tracker = SMTracker

#: The package's version: the one source (pyproject.toml reads it for the wheel).
__version__ = "0.1.0"

__all__ = [
    "AccountLeased",
    "AckPolicy",
    "DeliveryState",
    "FailureReason",
    "HBackwards",
    "HTooHigh",
    "IllegalPhaseEvent",
    "IllegalTransition",
    "LeaseLost",
    "LinkPhase",
    "MemoryStore",
    "MessageFailed",
    "MessageHandle",
    "RetryPolicy",
    "SMPhase",
    "SMProtocolError",
    "SMState",
    "SMStateError",
    "SMTracker",
    "SQLiteDatabase",
    "SQLiteStore",
    "StoreError",
    "TrackedMessage",
    "TrackerClosed",
    "TrackerStats",
    "TrackerStore",
    "__version__",
    "sm_tracker",
    "tracker_of",
]
