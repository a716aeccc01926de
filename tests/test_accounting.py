"""Issue 11 item 5: the cache's accounting is honest. What the store says the cache directory
takes equals what the disk says (`du`: st_blocks of every file and folder), the budget holds
against that truth after a streamed pass over more data than the budget, and no lock or temp
file outlives the pass. Real engine, real DVC-identical layouts (tests/dvclayout.py), a local
remote; counts and byte totals, never timings."""
from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

from dvclayout import write_layout
from sidecar.config import load_config
from sidecar.engine import Engine
from sidecar.fetch.job import ChunkJob
from sidecar.fs import FileSystem


def _engine(repo: Path, cache: Path, **flags) -> "asyncio.Future[Engine]":
    return Engine.open(load_config({"repo": str(repo), "revision": "main", "cache_dir": str(cache), **flags},
                                   env={}))


async def _read_all(engine: Engine, paths: list[str], parallel: int = 16) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(path: str) -> None:
        async with gate:
            await engine.read(path, 0, 1 << 20)
    await asyncio.gather(*(one(p) for p in paths))


def test_reading_many_tiny_files_keeps_no_finished_download_alive(tmp_path):
    """Each download job holds a chunk-size buffer (8 MiB by default for a probe of an
    unknown size). A finished job used to stay referenced by its deadline timer for the whole
    deadline: reading a few thousand tiny files in a minute took tens of GB of RAM (OOM)."""
    layout = write_layout(tmp_path / "l", folders=1, per_folder=300)

    async def go() -> None:
        async with await _engine(layout.repo, tmp_path / "cache") as engine:
            paths = [e.path for e in FileSystem(engine).walk_files("data")]
            await _read_all(engine, paths)
            gc.collect()
            alive = [o for o in gc.get_objects() if isinstance(o, ChunkJob)]
            assert len(paths) == 300
            assert alive == [], f"{len(alive)} finished download jobs (and their buffers) still held"
            assert engine.fetcher._job_ends == {}

    asyncio.run(go())
