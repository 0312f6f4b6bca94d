"""Stores for tracked-message records and the SM state."""

from .base import AccountLeased, LeasedStore, LeaseLost, SMState, StoreError, TrackerStore
from .memory import MemoryStore
from .sqlite import SQLiteDatabase, SQLiteStore

__all__ = [
    "AccountLeased",
    "LeaseLost",
    "LeasedStore",
    "MemoryStore",
    "SMState",
    "SQLiteDatabase",
    "SQLiteStore",
    "StoreError",
    "TrackerStore",
]
