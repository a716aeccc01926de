"""`dda get`: a file or a whole directory to local disk, files in parallel, atomically.

Never writes outside the destination: see safewrite (dir-fd relative, O_NOFOLLOW, names checked).
"""
from __future__ import annotations

import asyncio
import os
import posixpath
from pathlib import Path

from . import safewrite
from .engine import Engine
from .errors import NotFound
from .safewrite import UnsafePath, split_safe


async def download(engine: Engine, path: str, dest: Path | None, progress: bool = False) -> list[Path]:
    """Write `path` of the engine's revision (a file or a folder) to `dest`; returns the paths written.

    Raises NotFound for a path not in the revision and UnsafePath (before writing anything) for a
    repository name that would land outside `dest`.
    """
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
    # Every target is checked before anything is written: one hostile name fails the whole get.
    if single:
        if dest.name in ("", ".", ".."):
            raise UnsafePath(f"{str(dest)!r}: name a file to write, not a folder reference")
        root, jobs = dest.parent, [(entry, [dest.name]) for entry in entries]
    else:
        prefix = path + "/" if path else ""
        root, jobs = dest, [(entry, split_safe(entry.path[len(prefix):])) for entry in entries]
    total = sum(e.size or 0 for e in entries)
    root_fd = await asyncio.to_thread(safewrite.open_root, root)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    limit = asyncio.Semaphore(engine.config.jobs)
    written: list[Path] = []

    async def one(entry, parts: list[str]) -> None:  # type: ignore[no-untyped-def]
        async with limit:
            link = None
            if entry.is_symlink:   # git symlink: recreate it, as a checkout would (never followed)
                link = os.fsdecode(await engine.read(entry.path, 0, 1 << 20))
            dir_fd = await asyncio.to_thread(safewrite.open_parent, root_fd, parts)
            try:
                if link is not None:
                    await asyncio.to_thread(safewrite.place_symlink, link, parts[-1], dir_fd)
                else:
                    await _write_file(entry, parts[-1], dir_fd)
            finally:
                os.close(dir_fd)
            written.append(root.joinpath(*parts))

    async def _write_file(entry, name: str, dir_fd: int) -> None:  # type: ignore[no-untyped-def]
        tmp, fd = await asyncio.to_thread(safewrite.create_temp, name, dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                async for piece in engine.iter_bytes(entry.path):
                    await asyncio.to_thread(f.write, piece)
                    if bar is not None:
                        bar.update(len(piece))
                if entry.mode & 0o111:
                    os.fchmod(f.fileno(), 0o755)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        await asyncio.to_thread(safewrite.commit, tmp, name, dir_fd)

    try:
        # gather(return_exceptions) lets every writer finish before root_fd closes: a worker thread
        # still holding a closed (and reused) fd number could otherwise write into another folder.
        results = await asyncio.gather(*(one(e, parts) for e, parts in jobs), return_exceptions=True)
    finally:
        os.close(root_fd)
        if bar is not None:
            bar.close()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return written
