"""Nothing blocks the event loop (issue 10, Must work 2): during a mounted read and a hooks
read - cold, then warm - no chunk read or write, no index query or write and no md5/sha256
check runs on a thread that runs an event loop. Every Store and Index method (and the hash
checks) is wrapped to record the thread it ran on; the few that only compute names or queue
work for the index writer thread are allowed on the loop."""
from __future__ import annotations

import asyncio
import functools
import os
import threading
from pathlib import Path

import pytest

import sidecar.fetch.scheduler as scheduler
import sidecar.fetch.verify_stream as verify_stream
from mounting import MountThread
from sidecar.config import Config
from sidecar.sample import make_sample_repo
from sidecar.store.chunks import Store
from sidecar.store.index import Index
from sidecar.store.verify import ObjectVerifier

# Pure computations, and handing work to the index writer thread without waiting for it.
ALLOWED = {"chunk_count", "chunk_file", "chunk_path", "sums_file", "lock", "object_lock", "new_pending_tag",
           "index_later"}


@pytest.fixture
def on_loop(monkeypatch):
    """A list that collects `Class.method (thread)` for every store/index/hash call made on a
    thread with a running event loop."""
    seen: list[str] = []

    def guard(name: str, fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                asyncio.get_running_loop()
                seen.append(f"{name} ({threading.current_thread().name})")
            except RuntimeError:
                pass
            return fn(*args, **kwargs)
        return wrapper

    for cls in (Store, Index):
        for attr, value in list(vars(cls).items()):
            if callable(value) and attr not in ALLOWED and not attr.startswith("__"):
                monkeypatch.setattr(cls, attr, guard(f"{cls.__name__}.{attr}", value))
    monkeypatch.setattr(ObjectVerifier, "update", guard("ObjectVerifier.update", ObjectVerifier.update))
    monkeypatch.setattr(scheduler, "md5_matches", guard("md5_matches", scheduler.md5_matches))
    monkeypatch.setattr(scheduler, "chunk_digest", guard("chunk_digest", scheduler.chunk_digest))
    monkeypatch.setattr(verify_stream, "chunk_digest", guard("chunk_digest", verify_stream.chunk_digest))
    return seen


def files_under(root: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _, names in os.walk(root) for n in names)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mounted_reads_never_touch_the_store_on_the_loop(tmp_path, mp, on_loop):
    repo, _ = make_sample_repo(tmp_path / "sample", images=12, sizes=(20_000, 400_000))
    config = Config(repo=str(repo), cache_dir=tmp_path / "cache", chunk_size=128 * 1024)   # large files: passes
    with MountThread(config, mp):
        cold = {p: p.read_bytes() for p in files_under(mp)}
    assert len(cold) > 10 and any(len(d) > 128 * 1024 for d in cold.values())
    with MountThread(config, mp):   # warm: every chunk from the store
        warm = {p: p.read_bytes() for p in files_under(mp)}
    assert warm == cold
    assert not on_loop, sorted(set(on_loop))


def test_hooks_reads_never_touch_the_store_on_the_loop(tmp_path, on_loop):
    from sidecar.hooks import install_hooks, uninstall_hooks

    repo, _ = make_sample_repo(tmp_path / "sample", images=12, sizes=(20_000, 400_000))
    view = tmp_path / "view"
    os.environ["DDA_CHUNK_SIZE"] = str(128 * 1024)     # large files: verified passes
    try:
        install_hooks(str(repo), root=view, cache_dir=tmp_path / "cache")
    finally:
        del os.environ["DDA_CHUNK_SIZE"]
    try:
        import sidecar.hooks
        assert sidecar.hooks._state.runtime.engine.store.chunk_size == 128 * 1024
        first = {p: p.read_bytes() for p in files_under(view)}
        again = {p: p.read_bytes() for p in files_under(view)}
    finally:
        uninstall_hooks()
    assert len(first) > 10 and first == again and any(len(d) > 128 * 1024 for d in first.values())
    assert not on_loop, sorted(set(on_loop))
