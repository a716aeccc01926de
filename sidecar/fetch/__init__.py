"""Getting object bytes: cache first, then the remote, single-flight, bounded, retried."""
from .scheduler import Fetcher, FetchStats, ObjectRef

__all__ = ["Fetcher", "FetchStats", "ObjectRef"]
