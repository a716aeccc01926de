"""`dda demo`: build a sample DVC repository with its own local remote (no network), mount
it, read every file through the mount cold and then warm, and print a short report."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import Config
from .engine import Engine
from .sample import make_sample_repo


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _fuse_available() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed (pip install 'dda-sidecar[fuse]')"
    return None


def _read_all(paths: list[Path]) -> int:
    def one(p: Path) -> int:
        with open(p, "rb", buffering=0) as f:
            n = 0
            while chunk := f.read(1 << 20):
                n += len(chunk)
            return n
    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(one, paths))


def _status(mountpoint: Path) -> dict:
    return json.loads(os.getxattr(mountpoint, "user.dda.status"))


def run_demo(workdir: Path | None = None) -> int:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dda-demo-")) if workdir is None else workdir
    try:
        repo, remote = make_sample_repo(workdir / "sample")
        print(f"sample repository: {repo}\n  DVC remote (local directory): {remote}")
        config = Config(repo=str(repo), revision="v1", cache_dir=workdir / "cache")
        why_not = _fuse_available()
        if why_not:
            print(f"(no mount: {why_not}; streaming through the engine instead)")
            return asyncio.run(_engine_demo(config))
        return _mount_demo(config, workdir / "mnt")
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def _mount_demo(config: Config, mountpoint: Path) -> int:
    from .fuse.mount import run_daemon
    from .fuse.mountpoint import unmount

    mountpoint.mkdir()
    log_file = config.cache_dir / "logs" / "mount.log"
    passes = []
    for label in ("cold", "warm (after a remount: from the dda cache)"):
        started = time.monotonic()
        if run_daemon(config, mountpoint, "", False, log_file) != 0:
            return 1
        mounted_in = time.monotonic() - started
        try:
            files = [Path(d) / f for d, _, fs in os.walk(mountpoint) for f in fs]
            data = [p for p in files if "images" in p.parts or p.name == "labels.csv"]
            before = _status(mountpoint)
            t0 = time.monotonic()
            with open(data[0], "rb") as f:
                f.read(4096)
            ttfb = time.monotonic() - t0
            t0 = time.monotonic()
            served = _read_all(data)
            took = time.monotonic() - t0
            after = _status(mountpoint)
            passes.append((label, len(files), len(data), served, took, ttfb, before, after, mounted_in))
        finally:
            unmount(mountpoint)
            _wait_unmounted(mountpoint)
    print(f"mounted {config.repo} @ {passes[0][7]['revision']} (commit {passes[0][7]['commit'][:12]}) "
          f"on {mountpoint}")
    for label, nfiles, ndata, served, took, ttfb, before, after, mounted_in in passes:
        print(f"{label}:")
        print(f"  mount ready in {mounted_in * 1000:.0f} ms; {nfiles} files listed (os.walk), "
              f"{ndata} DVC-tracked files read, {_mb(served)} in {took * 1000:.0f} ms "
              f"({served / 1e6 / max(took, 1e-9):.0f} MB/s)")
        print(f"  time to first byte: {ttfb * 1000:.1f} ms; bytes fetched from the remote: "
              f"{_mb(after['bytes_fetched'] - before['bytes_fetched'])}; cache hits "
              f"{after['cache_hits'] - before['cache_hits']}, misses {after['cache_misses'] - before['cache_misses']}")
    print(f"cache: {passes[-1][7]['cache_dir']} ({_mb(passes[-1][7]['cache_used_bytes'])})")
    return 0


def _wait_unmounted(mountpoint: Path, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while os.path.ismount(mountpoint) and time.monotonic() < end:
        time.sleep(0.05)


async def _engine_demo(config: Config) -> int:
    started = time.monotonic()
    engine = await Engine.open(config)
    try:
        opened = time.monotonic() - started
        files = list(engine.tree.walk_files())
        dvc_files = [e for e in files if e.kind == "dvc"]
        print(f"snapshot {engine.info.revision} = {engine.info.commit[:12]}: {len(files)} files "
              f"({len(dvc_files)} tracked by DVC) listed in {opened * 1000:.0f} ms")
        t0 = time.monotonic()
        await engine.read(dvc_files[0].path, 0, 4096)
        ttfb = time.monotonic() - t0
        for label in ("cold", "warm"):
            before, hits = engine.fetcher.stats.bytes_fetched, engine.fetcher.stats.cache_hits
            t0 = time.monotonic()
            served = 0
            for entry in dvc_files:
                async for piece in engine.iter_bytes(entry.path):
                    served += len(piece)
            took = time.monotonic() - t0
            print(f"{label} pass: {len(dvc_files)} files, {_mb(served)} in {took * 1000:.0f} ms, fetched "
                  f"{_mb(engine.fetcher.stats.bytes_fetched - before)}, cache hits "
                  f"{engine.fetcher.stats.cache_hits - hits}/{len(dvc_files)}")
        print(f"time to first byte: {ttfb * 1000:.1f} ms")
    finally:
        await engine.aclose()
    return 0
