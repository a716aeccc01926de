"""The counts behind the declared counter instruments (sidecar.metrics.INSTRUMENTS).

Code counts an event where it happens, under the instrument's name and label values:
`counters.add("dda_remote_requests")`, `counters.add("dda_errors", 1, "deadline")`. /metrics
and `dda status` read the same cells through the instruments; FetchStats and PrefetchStats
are read-only views of them by their old field names. tests/test_instruments.py checks that
every name counted in the code is a declared counter.
"""
from __future__ import annotations

from collections import defaultdict


class Counters:
    """Monotonic counts of one engine, keyed by (instrument name, label values). Updated on
    the event loop (one thread), so plain ints suffice."""

    def __init__(self) -> None:
        self._cells: defaultdict[str, defaultdict[tuple[str, ...], int]] = defaultdict(lambda: defaultdict(int))

    def add(self, name: str, n: int = 1, *labels: str) -> None:
        """Count `n` events of instrument `name` with `labels` (its labels beyond repo/revision/mount)."""
        self._cells[name][labels] += n

    def get(self, name: str, *labels: str) -> int:
        cells = self._cells.get(name)
        return cells.get(labels, 0) if cells is not None else 0

    def labelled(self, name: str) -> dict[tuple[str, ...], int]:
        """{label values: count} of instrument `name` (what was counted so far)."""
        return dict(self._cells.get(name, {}))


class _View:
    """A read-only field of a stats view: one cell of the counters."""

    def __init__(self, name: str, *labels: str):
        self.name, self.labels = name, labels

    def __get__(self, obj: "_Stats | None", owner: type) -> int:
        if obj is None:
            return self  # type: ignore[return-value]
        return obj.counters.get(self.name, *self.labels)


class _Stats:
    def __init__(self, counters: Counters):
        self.counters = counters


class FetchStats(_Stats):
    """The fetch counters by their field names (read-only; counted in `Counters`)."""

    requests = _View("dda_remote_requests")
    bytes_fetched = _View("dda_remote_bytes")
    bytes_served = _View("dda_served_bytes")
    cache_hits = _View("dda_cache_reads", "data", "hit")         # reads answered from the cache alone
    cache_misses = _View("dda_cache_reads", "data", "miss")      # reads that needed the remote
    meta_hits = _View("dda_cache_reads", "metadata", "hit")      # sizes and .dir manifests from the cache/index
    meta_misses = _View("dda_cache_reads", "metadata", "miss")   # ... that needed the remote
    retries = _View("dda_remote_retries")
    hash_mismatches = _View("dda_hash_mismatches")
    size_lookups = _View("dda_remote_size_lookups")

    @property
    def errors(self) -> dict[str, int]:
        """{reason: failed reads}."""
        return {labels[0]: n for labels, n in self.counters.labelled("dda_errors").items()}


class PrefetchStats(_Stats):
    """The prefetch counters by their field names (read-only; counted in `Counters`)."""

    issued_files = _View("dda_prefetch_issued_files")
    issued_bytes = _View("dda_prefetch_issued_bytes")
    used_files = _View("dda_prefetch_used_files")        # prefetched files that a reader then opened
    wasted_files = _View("dda_prefetch_wasted_files")    # prefetched, then dropped from the plan unread
    readahead_chunks = _View("dda_readahead_chunks")
    failures = _View("dda_prefetch_failures")
