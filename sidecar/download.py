"""`dda get`: a file or a whole directory to local disk, files in parallel, atomically.
Reads through the file-system layer (sidecar.fs), like the mount and the hooks."""
from __future__ import annotations

import asyncio
import os
import posixpath
from pathlib import Path

from .errors import NotFound
from .fs import FileSystem


async def download(fs: FileSystem, path: str, dest: Path | None, progress: bool = False) -> list[Path]:
    """Write `path` (a file, or a directory with everything below it) to `dest`; returns
    the files written. Sizes are learned in bulk first (for the progress bar)."""
    path = fs.normalize(path)
    kind = fs.kind(path)
    if kind is None:
        raise NotFound(f"{path}: not in revision {fs.revision}", path=path)
    single = kind != "dir"
    name = posixpath.basename(path) or "repo"
    dest = dest or Path(name)
    if single and dest.is_dir():
        dest = dest / name
    paths = [e.path for e in fs.walk_files(path)]
    attrs = await fs.stat_many(paths)
    total = sum(a.size for _, a in attrs if a.kind == "file")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    limit = asyncio.Semaphore(fs.engine.config.jobs)
    written: list[Path] = []

    async def one(rel: str) -> None:
        target = dest if single else dest / posixpath.relpath(rel, path)
        async with limit:
            target.parent.mkdir(parents=True, exist_ok=True)
            if fs.kind(rel) == "symlink":   # git symlink: recreate it, as a checkout would
                link = await fs.readlink(rel)
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(link, target)
                written.append(target)
                return
            handle = await fs.open(rel)
            tmp = target.with_name(f".{target.name}.dda-part")
            try:
                with open(tmp, "wb") as f:
                    async for piece in fs.iter_bytes(handle):
                        await asyncio.to_thread(f.write, piece)
                        if bar is not None:
                            bar.update(len(piece))
            finally:
                fs.release(handle)
            if handle.entry.mode & 0o111:
                os.chmod(tmp, 0o755)
            os.replace(tmp, target)
            written.append(target)

    try:
        await asyncio.gather(*(one(p) for p in paths))
    finally:
        if bar is not None:
            bar.close()
    return written
