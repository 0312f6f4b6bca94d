"""Stores for tracked-message records and the SM state."""

from .base import SMState, StoreError, TrackerStore
from .memory import MemoryStore

__all__ = ["MemoryStore", "SMState", "StoreError", "TrackerStore"]
