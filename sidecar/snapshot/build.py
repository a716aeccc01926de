"""Build the Tree of one commit: git entries, then every DVC output laid over them."""
from __future__ import annotations

import asyncio
import posixpath
import stat
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..errors import DDAError, DvcFileError
from .dvcfiles import DvcConfig, DvcOut, ManifestEntry, parse_dvc_config, parse_dvc_file, parse_dvc_lock
from .git import GitEntry
from .tree import Tree, TreeBuilder

FILE_MODE = stat.S_IFREG | 0o644


@dataclass(frozen=True)
class DvcLayout:
    """What the commit's DVC files declare, before any remote is asked."""
    config: DvcConfig
    outputs: list[DvcOut]


async def read_dvc_layout(entries: list[GitEntry], read_blob: Callable[[str], Awaitable[bytes]]) -> DvcLayout:
    by_path = {e.path: e for e in entries if e.kind == "blob"}
    config = DvcConfig(None, {})
    if ".dvc/config" in by_path:
        config = parse_dvc_config(await read_blob(by_path[".dvc/config"].sha), ".dvc/config")
    sources = [e for e in by_path.values()
               if (e.path.endswith(".dvc") and not e.path.startswith(".dvc/") and not stat.S_ISLNK(e.mode))
               or posixpath.basename(e.path) == "dvc.lock"]
    blobs = await asyncio.gather(*(read_blob(e.sha) for e in sources))
    outputs: list[DvcOut] = []
    for entry, blob in zip(sources, blobs):
        if entry.path.endswith(".dvc"):
            outputs.extend(parse_dvc_file(blob, entry.path))
        else:
            outputs.extend(parse_dvc_lock(blob, entry.path))
    seen: dict[str, str] = {}
    for out in outputs:
        if out.path in seen and seen[out.path] != out.source:
            raise DvcFileError(f"{out.source}: output {out.path!r} is also declared by {seen[out.path]}")
        seen[out.path] = out.source
    return DvcLayout(config, outputs)


def compose_tree(git_entries: list[GitEntry], outputs: list[DvcOut],
                 manifests: dict[str, list[ManifestEntry]]) -> Tree:
    """`manifests`: md5 of each directory output -> its entries.

    Linear in the number of files (issue 11): each file looks up its own ancestors in a
    dict of output paths once, instead of every output scanning every file; entries go
    straight into the compact TreeBuilder (no Entry object per file is kept)."""
    # A DVC output replaces whatever git (or an earlier output) has at or below its path
    # (it is .gitignored in a real checkout): the last output declaring a path wins.
    covered_by = {o.path: i for i, o in enumerate(outputs)}

    def hidden(path: str, rank: int) -> bool:
        while True:
            owner = covered_by.get(path)
            if owner is not None and owner > rank:
                return True
            if "/" not in path:
                return False
            path = path.rsplit("/", 1)[0]

    builder = TreeBuilder()
    for e in git_entries:
        if e.kind != "blob":
            continue   # submodules show as nothing, as in a checkout without `--recursive`
        if hidden(e.path, -1):
            continue
        mode = e.mode if stat.S_ISLNK(e.mode) else (stat.S_IFREG | (0o755 if e.mode & 0o111 else 0o644))
        builder.add(e.path, "git", mode, e.size, e.sha)
    for rank, out in enumerate(outputs):
        if out.is_dir:
            for item in manifests[out.md5]:
                path = f"{out.path}/{item.relpath}"
                if not hidden(path, rank):
                    builder.add(path, "dvc", FILE_MODE, item.size, item.md5, out.legacy, out.remote, out.path)
        elif not hidden(out.path, rank):
            builder.add(out.path, "dvc", FILE_MODE, out.size, out.md5, out.legacy, out.remote, out.path)
    return builder.build()   # DDAError where a path is both a file and a directory
