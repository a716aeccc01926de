"""Metrics are declared once (sidecar.metrics.INSTRUMENTS): the Grafana dashboard queries only
declared instruments, /metrics exports each of them, and `dda status` reads its counters from
the same instruments (same values as /metrics at the same moment)."""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from sidecar import cli
from sidecar.metrics import INSTRUMENTS, Metrics, Sources, exposed_names, status_fields

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm" / "dda-sidecar" / "dashboards" / "dda-sidecar.json"
# what the status xattr carries besides the instruments' counters
STATUS_DESCRIPTIVE = {"repo", "revision", "commit", "subdir", "cache_dir", "latest_commit", "update_available"}


def _queries(node) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                found.append(value)
            found += _queries(value)
    elif isinstance(node, list):
        for value in node:
            found += _queries(value)
    return found


def test_dashboard_queries_only_declared_instruments():
    queries = _queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10
    used = {name for q in queries for name in re.findall(r"\bdda_[a-z0-9_]+", q)}
    assert used, queries
    unknown = used - exposed_names()
    assert not unknown, f"the dashboard queries metrics nobody declares: {sorted(unknown)}"


def test_instruments_are_declared_once_with_prometheus_names():
    names = [i.name for i in INSTRUMENTS]
    assert len(names) == len(set(names))
    for inst in INSTRUMENTS:
        assert inst.name.startswith("dda_") and not inst.name.endswith("_total"), inst.name
        assert inst.kind in ("counter", "gauge", "info", "histogram")
        assert (inst.read is None) == (inst.kind == "histogram" or inst.name == "dda_mount_up"), inst.name
        assert not {"path", "file", "name"} & set(inst.labels)       # bounded labels, never a path


def _fake_sources() -> Sources:
    stats = SimpleNamespace(requests=11, bytes_fetched=12, bytes_served=13, cache_hits=14, cache_misses=15,
                            meta_hits=16, meta_misses=17, retries=18, hash_mismatches=19, size_lookups=20,
                            errors={"deadline": 2})
    engine = SimpleNamespace(fetcher=SimpleNamespace(stats=stats), info=SimpleNamespace(files=21, commit="c0ffee",
                             resolve_seconds=0.5), store=SimpleNamespace(used_bytes=lambda: 22, budget=23, evictions=24,
                             disk_used=lambda: 25))
    prefetcher = SimpleNamespace(stats=SimpleNamespace(issued_files=31, issued_bytes=32, used_files=33,
                                                       wasted_files=34, readahead_chunks=35, failures=36))
    return Sources(engine, prefetcher, lambda: 41)


def test_dda_status_fields_come_from_the_instruments():
    """Every counter `dda status` prints is produced by status_fields (the instruments), with the
    value the instrument reads."""
    status = status_fields(_fake_sources())
    assert status["cache_hits"] == 14 and status["cache_misses"] == 15 and status["requests"] == 11
    assert status["errors"] == {"deadline": 2} and status["prefetch"]["readahead_chunks"] == 35
    assert status["files"] == 21 and status["open_files"] == 41 and status["cache_used_bytes"] == 22
    source = inspect.getsource(cli.cmd_status)
    printed = set(re.findall(r"status\['(\w+)'\]", source)) | set(re.findall(r"status\.get\('(\w+)'\)", source))
    nested = set(re.findall(r"\bp\['(\w+)'\]", source))
    assert printed and nested
    assert printed - STATUS_DESCRIPTIVE <= set(status), printed - STATUS_DESCRIPTIVE - set(status)
    assert nested <= set(status["prefetch"])


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_status_and_metrics_agree_on_a_live_mount(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from mounting import MountThread
    from sidecar.config import Config
    from sidecar.sample import make_sample_repo

    repo, _ = make_sample_repo(tmp_path / "s", images=6)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with MountThread(Config(repo=str(repo), cache_dir=tmp_path / "cache"), mp) as m:
        metrics = Metrics("x", "y", str(mp), mount_up=lambda: True)

        async def bind():
            metrics.bind(m.mount)

        async def both():
            return m.mount.ops.status(), metrics.render().decode()

        m.run(bind())
        for p in (mp / "data/images/cats").iterdir():
            p.read_bytes()
        (mp / "data/images/cats").iterdir().__next__().read_bytes()
        status, text = m.run(both())
        metrics.unbind()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    exported = {s.name for s in samples}
    for inst in INSTRUMENTS:
        assert set(inst.exposed) & exported, f"{inst.name} is declared but not exported"

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    checked = 0
    for inst in INSTRUMENTS:
        if inst.status is None:
            continue
        sample = inst.exposed[0]
        if isinstance(inst.status, dict):
            for key, labels in inst.status.items():
                assert status[key] == value(sample, **dict(zip(inst.labels, labels))), key
                checked += 1
            continue
        target, _, leaf = inst.status.rpartition(".")
        got = (status[target] if target else status)[leaf]
        if isinstance(got, dict):
            assert got == {k: v for k, v in ((s.labels[inst.labels[0]], s.value) for s in samples
                                             if s.name == sample) if v}, inst.name
        else:
            assert got == value(sample), inst.name
        checked += 1
    assert checked >= 15 and status["cache_hits"] + status["cache_misses"] > 0 and status["bytes_served"] > 0


def test_events_are_counted_under_declared_counter_instruments():
    """Code counts an event where it happens, under the name of a declared counter instrument
    (sidecar/counters.py); the stats views read those same cells."""
    from sidecar.counters import Counters, FetchStats, PrefetchStats, _View

    counted: set[str] = set()
    for path in (ROOT / "sidecar").rglob("*.py"):
        counted |= set(re.findall(r'counters\.add\(\s*"(dda_[a-z0-9_]+)"', path.read_text()))
    declared = {i.name for i in INSTRUMENTS if i.kind == "counter"}
    assert len(counted) >= 12, counted
    assert counted <= declared, counted - declared
    viewed = {v.name for cls in (FetchStats, PrefetchStats) for v in vars(cls).values() if isinstance(v, _View)}
    assert viewed <= declared, viewed - declared
    counters = Counters()
    counters.add("dda_cache_reads", 3, "data", "hit")
    counters.add("dda_errors", 1, "deadline")
    counters.add("dda_prefetch_used_files")
    assert FetchStats(counters).cache_hits == 3 and FetchStats(counters).errors == {"deadline": 1}
    assert PrefetchStats(counters).used_files == 1 and FetchStats(counters).cache_misses == 0
