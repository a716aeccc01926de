"""Content-addressed on-disk cache: verified chunk files, an index, LRU eviction."""
from .aio import AsyncStore
from .chunks import Store

__all__ = ["AsyncStore", "Store"]
