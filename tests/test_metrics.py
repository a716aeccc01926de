"""Metrics exposition (promtool-clean, bounded labels), the loader API path mapping, and the
training-side helper sidecar.loader (reporting, fail-soft, pinned sampler order)."""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sidecar import loader as loader_mod
from sidecar.loader import epoch_order, epoch_paths, instrument
from sidecar.metrics import Metrics
from sidecar.server import repo_path
from sidecar_util import promtool_check

ALLOWED_LABELS = {"repo", "revision", "mount", "commit", "kind", "result", "reason", "op", "status", "known", "le"}


def _dda_samples(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return [s for fam in text_string_to_metric_families(text) if fam.name.startswith("dda_") for s in fam.samples]


def test_before_the_mount_is_up_only_mount_up_is_exported():
    metrics = Metrics("https://host/o/r.git", "main", "/data")
    text = metrics.render().decode()
    check = promtool_check(text)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
    samples = _dda_samples(text)
    assert [(s.name, s.value) for s in samples] == [("dda_mount_up", 0.0)]
    assert metrics.observe_batch_waits([0.1]) == 0


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_bound_metrics_are_promtool_clean_and_never_name_a_path(tmp_path):
    from mounting import MountThread
    from sidecar.config import Config
    from sidecar.sample import make_sample_repo

    repo, _ = make_sample_repo(tmp_path / "s", images=10)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with MountThread(Config(repo=str(repo), cache_dir=tmp_path / "cache"), mp) as m:
        metrics = Metrics("x", "y", str(mp), mount_up=lambda: True)
        m.run(_bind(metrics, m.mount))
        data = {p.name: p.read_bytes() for p in (mp / "data/images/cats").iterdir()}
        assert sum(map(len, data.values())) > 0
        metrics.observe_batch_waits([0.5, 0.002])
        text = m.run(_render(metrics))
        metrics.unbind()
    check = promtool_check(text)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
    samples = _dda_samples(text)
    for s in samples:
        assert set(s.labels) <= ALLOWED_LABELS, s
        assert s.labels["mount"] == str(mp) and s.labels["revision"] == "main"
        assert not any("cat_" in v for v in s.labels.values()), s

    def value(name, **labels):
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("dda_cache_reads_total", kind="data") == len(data)
    assert value("dda_read_wait_seconds_count") == value("dda_cache_reads_total", kind="data", result="miss")
    assert value("dda_served_bytes_total") == sum(map(len, data.values()))
    assert value("dda_batch_wait_seconds_count") == 2 and value("dda_batch_wait_seconds_sum") == pytest.approx(0.502)
    assert value("dda_mount_up") == 1 and value("dda_snapshot_info") == 1
    assert {s.labels["reason"] for s in samples if s.name == "dda_errors_total"} >= {"deadline", "missing",
                                                                                      "unavailable", "hash_mismatch"}
    names = {s.name for s in samples}
    for family in ("dda_remote_bytes_total", "dda_cache_used_bytes", "dda_cache_budget_bytes",
                   "dda_cache_evictions_total", "dda_remote_retries_total", "dda_prefetch_issued_files_total",
                   "dda_prefetch_used_files_total", "dda_prefetch_wasted_files_total",
                   "dda_remote_request_duration_seconds_bucket"):
        assert family in names, family


async def _bind(metrics, mount):
    metrics.bind(mount)


async def _render(metrics):
    return metrics.render().decode()


def test_hint_paths_map_onto_the_repository():
    assert repo_path("data/a.jpg", "/data", "") == "data/a.jpg"
    assert repo_path("/data/images/a.jpg", "/data", "") == "images/a.jpg"
    assert repo_path("/data/images/a.jpg", "/data", "ds") == "ds/images/a.jpg"
    assert repo_path("images/../a.jpg", "/data", "ds") == "ds/a.jpg"
    assert repo_path("/elsewhere/a.jpg", "/data", "") is None
    assert repo_path("/database/a.jpg", "/data", "") is None
    assert repo_path("../../etc/passwd", "/data", "ds") is None


# -- sidecar.loader --------------------------------------------------------------------------------
class _Recorder(BaseHTTPRequestHandler):
    posts: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append((self.path, doc))
        reply = {"accepted": len(doc.get("paths", [])), "unknown": []} if self.path == "/v1/hints" else {"observed": 1}
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def recorder():
    _Recorder.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.posts
    server.shutdown()
    loader_mod._reporters.pop(f"http://127.0.0.1:{server.server_address[1]}", None)


def test_instrument_reports_batch_waits_and_hints(recorder):
    url, posts = recorder

    def slow():
        for i in range(5):
            time.sleep(0.02)
            yield i

    class Epochs:
        def __iter__(self):
            return slow()

        def __len__(self):
            return 5

    wrapped = instrument(Epochs(), url=url, hints=["/data/a.jpg", "b.jpg"], mount="/data")
    assert len(wrapped) == 5
    assert list(wrapped) == [0, 1, 2, 3, 4]
    assert wrapped.reporter.flush(5)
    hints = [doc for path, doc in posts if path == "/v1/hints"]
    waits = [v for path, doc in posts if path == "/v1/batch-wait" for v in doc["seconds"]]
    assert hints == [{"paths": ["a.jpg", "b.jpg"]}]
    assert len(waits) == 5 and all(0.015 < w < 1 for w in waits)
    assert len([p for p, _ in posts if p == "/v1/batch-wait"]) <= 2      # several observations per post


def test_instrument_fails_soft_when_the_sidecar_is_unreachable():
    def broken_hints():
        raise RuntimeError("dataset has no paths")

    started = time.monotonic()
    wrapped = instrument(range(1000), url="http://127.0.0.1:9", hints=broken_hints)
    assert sum(wrapped) == sum(range(1000))
    wrapped.reporter.flush(2)
    assert time.monotonic() - started < 5
    unreachable = instrument(range(3), url="http://10.255.255.1:9400", hints=["x"])   # blackholed: timeouts
    started = time.monotonic()
    assert list(unreachable) == [0, 1, 2]
    assert time.monotonic() - started < 0.5      # training never waits for the reporter


def test_epoch_order_pins_a_shuffled_dataloader():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    class DS:
        files = [f"img/{i}.jpg" for i in range(23)]

        def __len__(self):
            return 23

        def __getitem__(self, i):
            return i

    loader = DataLoader(DS(), batch_size=5, shuffle=True)
    hints = epoch_paths(loader)
    for _ in range(3):
        planned = hints()
        got = [DS.files[i] for batch in loader for i in batch.tolist()]
        assert got == planned
    assert len(loader) == 5
    sequential = DataLoader(DS(), batch_size=None)
    assert epoch_order(sequential) == list(range(23))
    random_unbatched = DataLoader(DS(), batch_size=None, shuffle=True)
    assert epoch_order(random_unbatched) is None       # cannot be predicted: no hints rather than wrong ones
    assert torch is not None
