"""Content-addressed on-disk cache: verified chunk files, an index, LRU eviction."""
from .chunks import Store

__all__ = ["Store"]
