"""`dda demo`: build a sample repository, stream it cold then warm, print a short report."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .config import Config
from .engine import Engine
from .sample import make_sample_repo


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


async def run_demo(workdir: Path | None = None) -> int:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dda-demo-")) if workdir is None else workdir
    try:
        repo, remote = make_sample_repo(workdir / "sample")
        print(f"sample repository: {repo} (DVC remote: {remote})")
        config = Config(repo=str(repo), revision="v1", cache_dir=workdir / "cache")

        started = time.monotonic()
        engine = await Engine.open(config)
        try:
            opened = time.monotonic() - started
            files = list(engine.tree.walk_files())
            dvc_files = [e for e in files if e.kind == "dvc"]
            print(f"snapshot {engine.info.revision} = {engine.info.commit[:12]}: {len(files)} files "
                  f"({len(dvc_files)} tracked by DVC) listed in {opened * 1000:.0f} ms, no data downloaded "
                  f"({engine.fetcher.stats.bytes_fetched} bytes: the .dir manifest)")

            first = dvc_files[0]
            t0 = time.monotonic()
            await engine.read(first.path, 0, 4096)
            ttfb = time.monotonic() - t0

            for label in ("cold", "warm"):
                before = engine.fetcher.stats.bytes_fetched
                hits = engine.fetcher.stats.cache_hits
                t0 = time.monotonic()
                served = 0
                for entry in dvc_files:
                    async for piece in engine.iter_bytes(entry.path):
                        served += len(piece)
                took = time.monotonic() - t0
                print(f"{label} pass: read {len(dvc_files)} files, {_mb(served)} in {took * 1000:.0f} ms "
                      f"({served / 1e6 / max(took, 1e-9):.0f} MB/s), fetched {_mb(engine.fetcher.stats.bytes_fetched - before)}, "
                      f"cache hits {engine.fetcher.stats.cache_hits - hits}/{len(dvc_files)}")
            stats = engine.fetcher.stats
            print(f"time to first byte: {ttfb * 1000:.1f} ms; remote requests: {stats.requests}; "
                  f"bytes fetched: {_mb(stats.bytes_fetched)}; verified md5 failures: {stats.hash_mismatches}")
            print(f"cache: {engine.store.root} ({_mb(engine.store.used_bytes())})")
        finally:
            await engine.aclose()
        return 0
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
