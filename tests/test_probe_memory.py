"""A download whose object size is not known yet (a probe of chunk 0) holds a buffer the size
of what arrived, not a whole chunk: reading many tiny files at once used to cost a full
chunk (8 MiB by default) per file in flight. Real engine and fetcher, a DVC-identical layout
(tests/dvclayout.py: its manifest carries no sizes) on a local remote; allocations measured
with tracemalloc, never timings."""
from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from dvclayout import write_layout
from sidecar.config import load_config
from sidecar.engine import Engine
from sidecar.fs import FileSystem

IN_FLIGHT = 32


def _engine(repo: Path, cache: Path) -> "asyncio.Future[Engine]":
    return Engine.open(load_config({"repo": str(repo), "revision": "main", "cache_dir": str(cache),
                                    "jobs": str(IN_FLIGHT)}, env={}))


def test_tiny_objects_of_unknown_size_cost_their_bytes_not_a_chunk_each(tmp_path):
    layout = write_layout(tmp_path / "l", folders=1, per_folder=256)   # 100-1,000 B each

    async def go() -> tuple[int, int, int]:
        async with await _engine(layout.repo, tmp_path / "cache") as engine:
            files = list(FileSystem(engine).walk_files("data"))
            assert all(e.size is None for e in files)      # every read is a probe
            chunk = engine.store.chunk_size
            gate = asyncio.Semaphore(IN_FLIGHT)
            got: list[bytes] = []

            async def one(path: str) -> None:
                async with gate:
                    got.append(await engine.read(path, 0, 1 << 20))

            tracemalloc.start()
            try:
                await asyncio.gather(*(one(e.path) for e in files))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return peak, chunk, sum(map(len, got))

    peak, chunk, read = asyncio.run(go())
    assert read == layout.total
    # before: IN_FLIGHT probes of a whole chunk each (32 x 8 MiB: 257 MiB); now ~1.3 MiB in all
    assert peak < min(chunk, 4 * 2**20), f"peak {peak / 2**20:.1f} MiB while reading {read} bytes"
