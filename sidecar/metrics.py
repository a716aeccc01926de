"""Prometheus metrics of a sidecar: the engine's own counters read at scrape time, plus
histograms fed where the events happen (remote requests, reads that waited for the network,
batch waits reported by the training-side loader).

Naming follows Prometheus conventions (`dda_` prefix, `_total`, `_seconds`, `_bytes`); every
series carries the same bounded labels (repo, revision, mount) and nothing ever names a file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .fuse.mount import Mount

CONTENT_TYPE = CONTENT_TYPE_LATEST
LABELS = ("repo", "revision", "mount")
# Error reasons are always exported (at 0 until they happen), so a dashboard never shows
# "no data" for a healthy sidecar. Other reasons the engine records appear as they occur.
ERROR_REASONS = ("unavailable", "deadline", "missing", "hash_mismatch")
REMOTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
READ_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_BATCH_WAIT = 24 * 3600.0


class Metrics:
    """One registry per sidecar. `bind(mount)` once the mount is live; before that only
    `dda_mount_up 0` (and the process metrics) are exported."""

    def __init__(self, repo: str, revision: str, mount: str, mount_up: Callable[[], bool] = lambda: False):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"repo": repo, "revision": revision, "mount": mount}
        self.mount: "Mount | None" = None
        self.commit = ""
        self.mount_up = mount_up
        self.hint_posts = 0
        self.hinted_paths = 0
        self.hinted_unknown = 0
        self.batch_wait: Histogram | None = None
        self.read_wait: Histogram | None = None
        self.remote_request: Histogram | None = None
        self._remote_children: dict[tuple[str, str], object] = {}
        self._early: list[tuple[str, str, float]] = []      # requests made before bind()
        self._read_wait_child: Any = None
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_EngineCollector(self))

    # -- wiring ---------------------------------------------------------------------------------
    def bind(self, mount: "Mount") -> None:
        """Start reading `mount`'s counters and observing its fetcher."""
        info = mount.engine.info
        assert info is not None
        self.labels = {"repo": info.repo, "revision": info.revision, "mount": str(mount.mountpoint)}
        self.commit = info.commit
        names = tuple(self.labels)
        self.read_wait = Histogram(
            "dda_read_wait_seconds", "Time reads of the mount blocked waiting for the remote (cache misses).",
            names, registry=self.registry, buckets=READ_WAIT_BUCKETS)
        self.batch_wait = Histogram(
            "dda_batch_wait_seconds", "Time the training loop waited for each batch (reported by sidecar.loader).",
            names, registry=self.registry, buckets=BATCH_WAIT_BUCKETS)
        self.remote_request = Histogram(
            "dda_remote_request_duration_seconds", "Duration of requests to DVC remotes, by operation and status.",
            names + ("op", "status"), registry=self.registry, buckets=REMOTE_BUCKETS)
        self._read_wait_child = self.read_wait.labels(**self.labels)
        self.batch_wait.labels(**self.labels)       # export the (empty) series from the start
        for op in ("read", "size"):
            self._remote(op, "ok")
        for op, status, seconds in self._early:
            self._remote(op, status).observe(seconds)
        self._early.clear()
        fetcher = mount.engine.fetcher
        fetcher.on_request, fetcher.on_read_wait = self.observe_request, self.observe_read_wait
        self.mount = mount

    def observers(self) -> tuple[Callable[[str, str, float], None], Callable[[float], None]]:
        """For `sidecar.fetch.scheduler.fetch_observers`, set before the engine opens."""
        return self.observe_request, self.observe_read_wait

    def observe_request(self, op: str, status: str, seconds: float) -> None:
        if self.remote_request is None:
            if len(self._early) < 100_000:
                self._early.append((op, status, seconds))
            return
        self._remote(op, status).observe(seconds)

    def observe_read_wait(self, seconds: float) -> None:
        if self._read_wait_child is not None:
            self._read_wait_child.observe(seconds)

    def unbind(self) -> None:
        if self.mount is not None:
            fetcher = self.mount.engine.fetcher
            fetcher.on_request = None
            fetcher.on_read_wait = None

    def _remote(self, op: str, status: str):  # type: ignore[no-untyped-def]
        child = self._remote_children.get((op, status))
        if child is None:
            assert self.remote_request is not None
            child = self.remote_request.labels(**self.labels, op=op, status=status)
            self._remote_children[(op, status)] = child
        return child

    # -- loader API -------------------------------------------------------------------------------
    def observe_batch_waits(self, values: Iterable[float]) -> int:
        if self.batch_wait is None:
            return 0
        child = self.batch_wait.labels(**self.labels)
        count = 0
        for value in values:
            child.observe(value)
            count += 1
        return count

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Reads FetchStats, PrefetchStats and the Store at scrape time."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []   # names depend on the mount's state; no up-front description

    def collect(self) -> Iterable[Metric]:
        m = self.m
        names = list(m.labels)
        values = list(m.labels.values())

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("dda_mount_up", "1 while the FUSE mount answers, else 0.", 1.0 if m.mount and m.mount_up() else 0.0)
        mount = m.mount
        if mount is None:
            return
        engine = mount.engine
        stats = engine.fetcher.stats
        info = engine.info
        assert info is not None

        snapshot = InfoMetricFamily("dda_snapshot", "The snapshot served: repository, revision and commit.",
                                    labels=names + ["commit"])
        snapshot.add_metric(values + [info.commit], {})
        yield snapshot
        yield gauge("dda_snapshot_files", "Files in the served snapshot.", info.files)
        yield gauge("dda_snapshot_resolve_seconds", "Time taken to resolve the snapshot at start.",
                    info.resolve_seconds)
        yield gauge("dda_snapshot_unavailable_outputs", "DVC outputs of the snapshot that cannot be shown "
                    "(missing manifest, malformed .dvc, unreachable import source); reads inside fail with EIO.",
                    len(engine.problems))

        reads = CounterMetricFamily("dda_cache_reads", "Reads answered from the local cache (hit) or needing "
                                    "the remote (miss); kind data = file bytes, metadata = sizes and manifests.",
                                    labels=names + ["kind", "result"])
        reads.add_metric(values + ["data", "hit"], stats.cache_hits)
        reads.add_metric(values + ["data", "miss"], stats.cache_misses)
        reads.add_metric(values + ["metadata", "hit"], stats.meta_hits)
        reads.add_metric(values + ["metadata", "miss"], stats.meta_misses)
        yield reads
        yield counter("dda_remote_bytes", "Bytes downloaded from DVC remotes.", stats.bytes_fetched)
        yield counter("dda_served_bytes", "Bytes served to readers of the mount.", stats.bytes_served)
        yield counter("dda_remote_retries", "Retries of failed remote requests.", stats.retries)
        yield counter("dda_hash_mismatches", "Downloads whose content did not match its md5.", stats.hash_mismatches)
        errors = CounterMetricFamily("dda_errors", "Reads that failed, by reason.", labels=names + ["reason"])
        seen = dict.fromkeys(ERROR_REASONS, 0)
        seen.update(stats.errors)
        for reason, count in sorted(seen.items()):
            errors.add_metric(values + [reason], count)
        yield errors

        store = engine.store
        yield gauge("dda_cache_used_bytes", "Bytes held in the local cache.", store.used_bytes())
        yield gauge("dda_cache_budget_bytes", "Cache budget (--cache-size).", store.budget)
        yield counter("dda_cache_evictions", "Chunks evicted from the cache to stay within its budget.",
                      store.evictions)

        p = mount.prefetcher.stats
        yield counter("dda_prefetch_issued_files", "Files fetched ahead of readers (hints, directory walks).",
                      p.issued_files)
        yield counter("dda_prefetch_issued_bytes", "Bytes of files fetched ahead of readers.", p.issued_bytes)
        yield counter("dda_prefetch_used_files", "Prefetched files that a reader then opened.", p.used_files)
        yield counter("dda_prefetch_wasted_files", "Prefetched files dropped from the plan unread.", p.wasted_files)
        yield counter("dda_prefetch_failures", "Prefetches and readaheads that failed.", p.failures)
        yield counter("dda_readahead_chunks", "Chunks fetched by sequential readahead.", p.readahead_chunks)
        yield counter("dda_hint_requests", "Prefetch hint lists received from the loader API.", m.hint_posts)
        hinted = CounterMetricFamily("dda_hinted_files", "Paths received as prefetch hints, by whether the "
                                     "snapshot has them.", labels=names + ["known"])
        hinted.add_metric(values + ["true"], m.hinted_paths - m.hinted_unknown)
        hinted.add_metric(values + ["false"], m.hinted_unknown)
        yield hinted
        yield gauge("dda_open_files", "Files open on the mount.", len(mount.ops._open))
