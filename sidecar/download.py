"""`dda get`: a file or a whole directory to local disk, files in parallel, atomically.

Reads through the file-system layer (sidecar.fs), like the mount and the hooks. Never writes
outside the destination: see safewrite (dir-fd relative, O_NOFOLLOW, names checked).
"""
from __future__ import annotations

import asyncio
import os
import posixpath
from pathlib import Path

from . import safewrite
from .errors import DDAError, NotFound, describe
from .fs import FileSystem
from .safewrite import UnsafePath, split_safe


class IncompleteDownload(DDAError):
    """Some files could not be fetched (each named in `failures`); every other one was written."""

    reason = "incomplete"

    def __init__(self, failures: list[tuple[str, BaseException]], total: int):
        first = describe(failures[0][1])
        super().__init__(f"{len(failures)} of {total} files not written (the others were): first "
                         f"{failures[0][0]}: {first.message}", path=failures[0][0], errno=first.errno)
        self.failures = failures
        self.total = total


def _empty_dirs(fs: FileSystem, path: str) -> list[str]:
    """The folders strictly below `path` with nothing in them, outside any output the snapshot
    cannot show (one pass over the tree's folders, not its files)."""
    tree = fs.tree
    prefix = path + "/" if path else ""
    return sorted(d for d in tree.dirs if d.startswith(prefix) and d != path and not tree.dirs[d]
                  and tree.problem_at(d) is None)


async def _create_temp(dir_fd: int) -> tuple[str, int]:
    """safewrite.create_temp in a worker thread; cancelled (Ctrl-C) while it runs, the file it
    made is still removed: its name is random, so no later run would find and reuse it."""
    made = asyncio.ensure_future(asyncio.to_thread(safewrite.create_temp, dir_fd))
    try:
        return await asyncio.shield(made)
    except asyncio.CancelledError:
        try:
            tmp, fd = await made      # one open(2): wait for it, then undo it
        except Exception:
            raise asyncio.CancelledError from None
        os.close(fd)
        safewrite.discard(tmp, dir_fd)
        raise


async def download(fs: FileSystem, path: str, dest: Path | None, progress: bool = False) -> list[Path]:
    """Write `path` of the revision (a file, or a folder with everything below it) to `dest`;
    returns the paths written. Sizes are learned in bulk first (for the progress bar).

    Like `dvc pull`, one file that cannot be fetched (its object missing on the remote, its
    request past its own deadline, a wrong object) never stops the others: every other file
    is written, then IncompleteDownload names each failure. Raises NotFound for a path not in
    the revision and UnsafePath (before writing anything) for a repository name that would
    land outside `dest`; a single file's own error is raised as it is.
    """
    path = fs.normalize(path)
    kind = fs.kind(path)
    if kind is None:
        raise NotFound(f"{path}: not in revision {fs.revision}", path=path)
    single = kind != "dir"
    name = posixpath.basename(path) or "repo"
    dest = dest or Path(name)
    if single and dest.is_dir():
        dest = dest / name
    # Outputs the snapshot cannot show are skipped here (the caller names them); a file asked
    # for by name still fails with its cause.
    paths = [e.path for e in fs.walk_files(path)
             if single or (e.kind != "broken" and fs.tree.problem_at(e.path) is None)]
    # Every target is checked before anything is written: one hostile name fails the whole get.
    empty: list[list[str]] = []
    if single:
        if dest.name in ("", ".", ".."):
            raise UnsafePath(f"{str(dest)!r}: name a file to write, not a folder reference")
        root, jobs = dest.parent, [(rel, [dest.name]) for rel in paths]
    else:
        prefix = path + "/" if path else ""
        root, jobs = dest, [(rel, split_safe(rel[len(prefix):])) for rel in paths]
        empty = [split_safe(d[len(prefix):]) for d in _empty_dirs(fs, path)]
    failures: list[tuple[str, BaseException]] = []
    attrs = await fs.stat_each(paths)
    unsized = {p for p, a in attrs if isinstance(a, DDAError)}
    if single and unsized:
        raise next(a for _, a in attrs if isinstance(a, DDAError))
    failures += [(p, a) for p, a in attrs if isinstance(a, DDAError)]
    jobs = [(rel, parts) for rel, parts in jobs if rel not in unsized]
    total = sum(a.size for _, a in attrs if not isinstance(a, DDAError) and a.kind == "file")
    root_fd = await asyncio.to_thread(safewrite.open_root, root)
    if empty:   # a checkout has them (a submodule's path, an empty tracked directory)
        try:
            await asyncio.to_thread(lambda: [safewrite.make_dir(root_fd, parts) for parts in empty])
        except BaseException:
            os.close(root_fd)
            raise
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    limit = asyncio.Semaphore(fs.engine.config.jobs)
    written: list[Path] = []

    async def one(rel: str, parts: list[str]) -> None:
        async with limit:
            link = None
            if fs.kind(rel) == "symlink":   # git symlink: recreate it, as a checkout would (never followed)
                link = await fs.readlink(rel)
            dir_fd = await asyncio.to_thread(safewrite.open_parent, root_fd, parts)
            try:
                if link is not None:
                    await asyncio.to_thread(safewrite.place_symlink, link, parts[-1], dir_fd)
                else:
                    await _write_file(rel, parts[-1], dir_fd)
            finally:
                os.close(dir_fd)
            written.append(root.joinpath(*parts))

    async def _write_file(rel: str, name: str, dir_fd: int) -> None:
        # Nobody is shown this handle's size: the verified object has the last word on it.
        handle = await fs.open(rel, shown=False)
        try:
            tmp, fd = await _create_temp(dir_fd)
        except BaseException:
            fs.release(handle)
            raise
        try:
            try:
                with os.fdopen(fd, "wb") as f:
                    async for piece in fs.iter_bytes(handle):
                        await asyncio.to_thread(f.write, piece)
                        if bar is not None:
                            bar.update(len(piece))
                    if handle.entry.mode & 0o111:
                        os.fchmod(f.fileno(), 0o755)
            finally:
                fs.release(handle)
            await asyncio.to_thread(safewrite.commit, tmp, name, dir_fd)
        except BaseException:
            safewrite.discard(tmp, dir_fd)
            raise

    try:
        # gather(return_exceptions) lets every writer finish before root_fd closes: a worker thread
        # still holding a closed (and reused) fd number could otherwise write into another folder.
        results = await asyncio.gather(*(one(rel, parts) for rel, parts in jobs), return_exceptions=True)
    finally:
        os.close(root_fd)
        if bar is not None:
            bar.close()
    for (rel, _), result in zip(jobs, results):
        if isinstance(result, DDAError) and not isinstance(result, UnsafePath) and not single:
            failures.append((rel, result))     # that file's own failure: the others stand
        elif isinstance(result, BaseException):
            raise result
    if failures:
        raise IncompleteDownload(sorted(failures, key=lambda f: f[0]), len(paths))
    return written
