"""Stores for tracked-message records and the SM state."""

from .base import SMState, StoreError, TrackerStore
from .memory import MemoryStore
from .sqlite import SQLiteDatabase, SQLiteStore

__all__ = ["MemoryStore", "SMState", "SQLiteDatabase", "SQLiteStore", "StoreError", "TrackerStore"]
