"""`dda get`: a file or a whole directory to local disk, files in parallel, atomically."""
from __future__ import annotations

import asyncio
import os
import posixpath
from pathlib import Path

from .engine import Engine
from .errors import NotFound


async def download(engine: Engine, path: str, dest: Path | None, progress: bool = False) -> list[Path]:
    tree = engine.tree
    path = tree.normalize(path)
    if not tree.exists(path):
        raise NotFound(f"{path}: not in revision {engine.info.revision if engine.info else '?'}")
    single = path in tree.files
    name = posixpath.basename(path) or "repo"
    dest = dest or Path(name)
    if single and dest.is_dir():
        dest = dest / name
    entries = await engine.stat_many(list(tree.walk_files(path)))
    total = sum(e.size or 0 for e in entries)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    limit = asyncio.Semaphore(engine.config.jobs)
    written: list[Path] = []

    async def one(entry) -> None:  # type: ignore[no-untyped-def]
        target = dest if single else dest / posixpath.relpath(entry.path, path)
        async with limit:
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.is_symlink:   # git symlink: recreate it, as a checkout would
                link = os.fsdecode(await engine.read(entry.path, 0, 1 << 20))
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(link, target)
                written.append(target)
                return
            tmp = target.with_name(f".{target.name}.dda-part")
            with open(tmp, "wb") as f:
                async for piece in engine.iter_bytes(entry.path):
                    await asyncio.to_thread(f.write, piece)
                    if bar is not None:
                        bar.update(len(piece))
            if entry.mode & 0o111:
                os.chmod(tmp, 0o755)
            os.replace(tmp, target)
            written.append(target)

    try:
        await asyncio.gather(*(one(e) for e in entries))
    finally:
        if bar is not None:
            bar.close()
    return written
