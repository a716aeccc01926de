"""Prometheus metrics of a sidecar: the declared instruments. Counters are counted where their
event happens (sidecar/counters.py, under the instrument's name) and read at scrape time, plus
histograms fed where the events happen (remote requests, reads that waited for the network,
batch waits reported by the training-side loader).

Naming follows Prometheus conventions (`dda_` prefix, `_total`, `_seconds`, `_bytes`); every
series carries the same bounded labels (repo, revision, mount) and nothing ever names a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

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


@dataclass(frozen=True)
class Sources:
    """Where instruments read their values: the engine (fetcher stats, store, snapshot), the
    prefetcher, the open-file count, and the sidecar's own Metrics (loader API counters)."""

    engine: Any
    prefetcher: Any
    open_files: Callable[[], int]
    metrics: "Metrics | None" = None


@dataclass(frozen=True)
class Instrument:
    """One metric, declared once. `name` is the Prometheus family (counters without `_total`,
    which the exposition adds). `read(sources)` gives the value, or {label values: value} when
    the instrument has `labels` beyond repo/revision/mount. `status` names the `dda status`
    field it feeds: a key (dotted for nested: "prefetch.used_files"), or for labelled
    instruments a map {status key: label values}; a plain key on a labelled instrument gives
    {label value: count} of the non-zero ones. Histograms are observed where their event
    happens (Metrics.observe_*) and have no `read`."""

    name: str
    kind: str                                   # counter | gauge | info | histogram
    doc: str
    labels: tuple[str, ...] = ()
    read: Callable[[Sources], Any] | None = None
    status: str | Mapping[str, tuple[str, ...]] | None = None
    buckets: tuple[float, ...] = ()

    @property
    def exposed(self) -> tuple[str, ...]:
        """The sample names this instrument puts on /metrics."""
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "info":
            return (self.name + "_info",)
        if self.kind == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


def _stats(s: Sources) -> Any:
    return s.engine.fetcher.stats


def _errors(s: Sources) -> dict[tuple[str, ...], int]:
    seen = dict.fromkeys(ERROR_REASONS, 0)
    seen.update(_stats(s).errors)
    return {(reason,): count for reason, count in sorted(seen.items())}


def _hinted(s: Sources) -> dict[tuple[str, ...], int]:
    m = s.metrics
    known = (m.hinted_paths - m.hinted_unknown) if m else 0
    return {("true",): known, ("false",): m.hinted_unknown if m else 0}


# Every metric of a sidecar. /metrics, `dda status` (the mount's status xattr) and the Grafana
# dashboard (helm/dda-sidecar/dashboards/dda-sidecar.json) all read these; tests check it.
INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("dda_mount_up", "gauge", "1 while the FUSE mount answers, else 0."),
    Instrument("dda_snapshot", "info", "The snapshot served: repository, revision and commit.", ("commit",),
               lambda s: {(s.engine.info.commit,): 1}),
    Instrument("dda_snapshot_files", "gauge", "Files in the served snapshot.", (),
               lambda s: s.engine.info.files, "files"),
    Instrument("dda_snapshot_resolve_seconds", "gauge", "Time taken to resolve the snapshot at start.", (),
               lambda s: s.engine.info.resolve_seconds),
    Instrument("dda_snapshot_unavailable_outputs", "gauge", "DVC outputs of the snapshot that cannot be shown "
               "(missing manifest, malformed .dvc, unreachable import source); reads inside fail with EIO.", (),
               lambda s: len(s.engine.problems)),
    Instrument("dda_cache_reads", "counter", "Reads answered from the local cache (hit) or needing the remote "
               "(miss); kind data = file bytes, metadata = sizes and manifests.", ("kind", "result"),
               lambda s: {("data", "hit"): _stats(s).cache_hits, ("data", "miss"): _stats(s).cache_misses,
                          ("metadata", "hit"): _stats(s).meta_hits, ("metadata", "miss"): _stats(s).meta_misses},
               {"cache_hits": ("data", "hit"), "cache_misses": ("data", "miss")}),
    Instrument("dda_remote_requests", "counter", "Requests made to DVC remotes.", (),
               lambda s: _stats(s).requests, "requests"),
    Instrument("dda_remote_bytes", "counter", "Bytes downloaded from DVC remotes.", (),
               lambda s: _stats(s).bytes_fetched, "bytes_fetched"),
    Instrument("dda_served_bytes", "counter", "Bytes served to readers of the mount.", (),
               lambda s: _stats(s).bytes_served, "bytes_served"),
    Instrument("dda_remote_size_lookups", "counter", "Size lookups answered by DVC remotes (a HEAD per file, or "
               "one listing per folder).", (), lambda s: _stats(s).size_lookups, "size_lookups"),
    Instrument("dda_remote_retries", "counter", "Retries of failed remote requests.", (),
               lambda s: _stats(s).retries, "retries"),
    Instrument("dda_hash_mismatches", "counter", "Downloads whose content did not match its md5.", (),
               lambda s: _stats(s).hash_mismatches, "hash_mismatches"),
    Instrument("dda_errors", "counter", "Reads that failed, by reason.", ("reason",), _errors, "errors"),
    Instrument("dda_cache_used_bytes", "gauge", "Bytes held in the local cache.", (),
               lambda s: s.engine.store.used_bytes(), "cache_used_bytes"),
    Instrument("dda_cache_disk_bytes", "gauge", "Bytes the cache directory takes on disk (st_blocks of every file "
               "and folder, as du counts them): what --cache-size holds.", (),
               lambda s: s.engine.store.disk_used(), "cache_disk_bytes"),
    Instrument("dda_cache_budget_bytes", "gauge", "Cache budget (--cache-size).", (),
               lambda s: s.engine.store.budget, "cache_budget_bytes"),
    Instrument("dda_cache_evictions", "counter", "Chunks evicted from the cache to stay within its budget.", (),
               lambda s: s.engine.store.evictions, "cache_evictions"),
    Instrument("dda_prefetch_issued_files", "counter", "Files fetched ahead of readers (hints, directory walks).",
               (), lambda s: s.prefetcher.stats.issued_files, "prefetch.issued_files"),
    Instrument("dda_prefetch_issued_bytes", "counter", "Bytes of files fetched ahead of readers.", (),
               lambda s: s.prefetcher.stats.issued_bytes, "prefetch.issued_bytes"),
    Instrument("dda_prefetch_used_files", "counter", "Prefetched files that a reader then opened.", (),
               lambda s: s.prefetcher.stats.used_files, "prefetch.used_files"),
    Instrument("dda_prefetch_wasted_files", "counter", "Prefetched files dropped from the plan unread.", (),
               lambda s: s.prefetcher.stats.wasted_files, "prefetch.wasted_files"),
    Instrument("dda_prefetch_failures", "counter", "Prefetches and readaheads that failed.", (),
               lambda s: s.prefetcher.stats.failures, "prefetch.failures"),
    Instrument("dda_readahead_chunks", "counter", "Chunks fetched by sequential readahead.", (),
               lambda s: s.prefetcher.stats.readahead_chunks, "prefetch.readahead_chunks"),
    Instrument("dda_hint_requests", "counter", "Prefetch hint lists received from the loader API.", (),
               lambda s: s.metrics.hint_posts if s.metrics else 0),
    Instrument("dda_hinted_files", "counter", "Paths received as prefetch hints, by whether the snapshot has them.",
               ("known",), _hinted),
    Instrument("dda_open_files", "gauge", "Files open on the mount.", (), lambda s: s.open_files(), "open_files"),
    Instrument("dda_read_wait_seconds", "histogram",
               "Time reads of the mount blocked waiting for the remote (cache misses).", buckets=READ_WAIT_BUCKETS),
    Instrument("dda_batch_wait_seconds", "histogram",
               "Time the training loop waited for each batch (reported by sidecar.loader).",
               buckets=BATCH_WAIT_BUCKETS),
    Instrument("dda_remote_request_duration_seconds", "histogram",
               "Duration of requests to DVC remotes, by operation and status.", ("op", "status"),
               buckets=REMOTE_BUCKETS),
)
BY_NAME = {i.name: i for i in INSTRUMENTS}


def exposed_names() -> set[str]:
    """Every sample name /metrics can carry (what a dashboard may query)."""
    return {name for i in INSTRUMENTS for name in i.exposed}


def status_fields(sources: Sources) -> dict[str, Any]:
    """The counters of `dda status`, read from the same instruments as /metrics."""
    out: dict[str, Any] = {}
    for inst in INSTRUMENTS:
        if inst.status is None or inst.read is None:
            continue
        value = inst.read(sources)
        if isinstance(inst.status, Mapping):
            for key, labels in inst.status.items():
                out[key] = value[labels]
            continue
        if isinstance(value, dict):
            value = {k[0] if len(k) == 1 else ",".join(k): v for k, v in value.items() if v}
        target, _, leaf = inst.status.rpartition(".")
        (out.setdefault(target, {}) if target else out)[leaf] = value
    return out


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

        def histogram(name: str) -> Histogram:
            inst = BY_NAME[name]
            return Histogram(name, inst.doc, names + inst.labels, registry=self.registry, buckets=inst.buckets)

        self.read_wait = histogram("dda_read_wait_seconds")
        self.batch_wait = histogram("dda_batch_wait_seconds")
        self.remote_request = histogram("dda_remote_request_duration_seconds")
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
    """Reads the declared instruments (INSTRUMENTS) at scrape time."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []   # names depend on the mount's state; no up-front description

    def collect(self) -> Iterable[Metric]:
        m = self.m
        names = list(m.labels)
        values = list(m.labels.values())
        up = BY_NAME["dda_mount_up"]
        family = GaugeMetricFamily(up.name, up.doc, labels=names)
        family.add_metric(values, 1.0 if m.mount and m.mount_up() else 0.0)
        yield family
        mount = m.mount
        if mount is None:
            return
        sources = Sources(mount.engine, mount.prefetcher, lambda: len(mount.ops._open), m)
        for inst in INSTRUMENTS:
            if inst.read is None:
                continue
            value = inst.read(sources)
            rows = value.items() if isinstance(value, dict) else [((), value)]
            labels = names + list(inst.labels)
            if inst.kind == "info":
                info = InfoMetricFamily(inst.name, inst.doc, labels=labels)
                for extra, _ in rows:
                    info.add_metric(values + list(extra), {})
                yield info
                continue
            cls = CounterMetricFamily if inst.kind == "counter" else GaugeMetricFamily
            family = cls(inst.name, inst.doc, labels=labels)
            for extra, number in rows:
                family.add_metric(values + list(extra), number)
            yield family
