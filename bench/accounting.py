"""Cache accounting at the issue's size (#11 item 5): a DVC-identical layout of tiny files
(default 72 x 1,000 files of 100-1,000 B, local remote), every file read once through the
engine with a fresh cache, then what the store counts against `du` of the cache directory.
Byte totals and counts, no timings. Results: bench/accounting-results.md.

    python bench/accounting.py --workdir /tmp/acct --budget 20G --budget 100M
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from dvclayout import write_layout          # noqa: E402
from sidecar.config import load_config      # noqa: E402
from sidecar.engine import Engine           # noqa: E402
from sidecar.fs import FileSystem           # noqa: E402


def du(folder: Path) -> int:
    """`du --block-size=1 -s`: st_blocks * 512 of every file and folder."""
    total = os.lstat(folder).st_blocks * 512
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


async def one_pass(repo: Path, cache: Path, budget: str, parallel: int) -> dict[str, int]:
    shutil.rmtree(cache, ignore_errors=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            if cache.exists():
                peak[0] = max(peak[0], du(cache))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    config = load_config({"repo": str(repo), "revision": "main", "cache_dir": str(cache), "cache_size": budget}, env={})
    async with await Engine.open(config) as engine:
        paths = [e.path for e in FileSystem(engine).walk_files("data")]
        gate = asyncio.Semaphore(parallel)

        async def read(path: str) -> None:
            async with gate:
                await engine.read(path, 0, 1 << 20)
        await asyncio.gather(*(read(p) for p in paths))
        store = engine.store
        await asyncio.to_thread(store.index.flush)
        await asyncio.to_thread(store.index_settled, 60)
        folders = sum(os.lstat(e.path).st_blocks * 512 for e in os.scandir(store.root / "chunks"))
        row = {"files": len(paths), "payload": store.index.used_bytes(), "chunk_files": store.index.disk_bytes(),
               "chunk_folders": folders, "index": sum(p.stat().st_blocks * 512 for p in store.root.glob("index.sqlite*")),
               "counted": await asyncio.to_thread(store.disk_usage), "du": du(cache),
               "evictions": store.evictions, "requests": engine.fetcher.stats.requests}
    stop.set()
    sampler.join()
    row.update(du_after_close=du(cache), peak=peak[0],
               chunk_locks=sum(1 for n in os.listdir(cache / "store-v2" / "locks") if not n.startswith("object-")),
               tmp_files=len(os.listdir(cache / "store-v2" / "tmp")))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--folders", type=int, default=72)
    ap.add_argument("--per-folder", type=int, default=1000)
    ap.add_argument("--budget", action="append", help="cache budget of a pass (repeatable; default 20G)")
    ap.add_argument("--parallel", type=int, default=32)
    args = ap.parse_args()
    layout_dir = args.workdir / f"layout-{args.folders}x{args.per_folder}"
    if not (layout_dir / "repo").exists():
        write_layout(layout_dir, folders=args.folders, per_folder=args.per_folder, min_size=100, max_size=1000)
    for budget in args.budget or ["20G"]:
        row = asyncio.run(one_pass(layout_dir / "repo", args.workdir / f"cache-{budget}", budget, args.parallel))
        print(f"budget {budget}: " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
