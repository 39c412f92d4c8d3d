"""The memory store: FAISS indexes over durable segment logs. No HTTP, no SQL here."""
from memsvc.contract import Entries, MemoryBackend, MemorySpec, SearchResult
from memsvc.store.memory import Memory
from memsvc.store.store import Store

__all__ = ["Entries", "Memory", "MemoryBackend", "MemorySpec", "SearchResult", "Store"]
