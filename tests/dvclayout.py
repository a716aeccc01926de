"""A DVC-identical repository + remote for big trees, written directly (no `dvc add` of 1M
files): objects at `files/md5/ab/cdef...`, the `.dir` manifest exactly as dvc-data writes it
(`json.dumps(sorted list of {"md5", "relpath"}, sort_keys=True)`), a `data.dvc` as DVC 3
writes it, `.dvc/config` naming the remote, one git commit. Used by the scale tests and by
bench/scale.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    repo: Path
    remote_root: Path
    out: str              # the tracked directory, e.g. "data"
    manifest_md5: str
    nfiles: int
    total: int
    biggest_folder: str   # repository path of the folder with most files


def _git(repo: Path, *args: str) -> None:
    env = {"GIT_AUTHOR_NAME": "dda", "GIT_AUTHOR_EMAIL": "dda@dda.invalid", "GIT_COMMITTER_NAME": "dda",
           "GIT_COMMITTER_EMAIL": "dda@dda.invalid", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(repo)}
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


def write_layout(workdir: Path, *, folders: int, per_folder: int, remote_url: str | None = None,
                 remote: Path | None = None, checkout: Path | None = None, out: str = "data", seed: int = 0, min_size: int = 100, max_size: int = 1000) -> Layout:
    """`folders` x `per_folder` files of `min_size`..`max_size` random bytes under `out/`
    (folders `d0000`..., files `f000000.bin`...; with folders=1 the files sit in `out/`).
    The remote is `remote` (default `workdir/remote`; its URL in .dvc/config: `remote_url` or
    that path). `checkout`: also write the files there as `dvc pull` would (a baseline)."""
    rng = random.Random(seed)
    repo, remote = workdir / "repo", remote or workdir / "remote"
    repo.mkdir(parents=True)
    remote.mkdir(parents=True, exist_ok=True)
    entries = []
    total = 0
    made: set[str] = set()
    for d in range(folders):
        folder = f"d{d:04d}/" if folders > 1 else ""
        for f in range(per_folder):
            data = rng.randbytes(rng.randint(min_size, max_size))
            md5 = hashlib.md5(data).hexdigest()
            total += len(data)
            entries.append({"md5": md5, "relpath": f"{folder}f{f:06d}.bin"})
            sub = remote / "files" / "md5" / md5[:2]
            if md5[:2] not in made:
                sub.mkdir(parents=True, exist_ok=True)
                made.add(md5[:2])
            (sub / md5[2:]).write_bytes(data)
            if checkout is not None:
                where = checkout / out / folder
                if f == 0:
                    where.mkdir(parents=True, exist_ok=True)
                (where / f"f{f:06d}.bin").write_bytes(data)
    entries.sort(key=lambda e: e["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    mmd5 = hashlib.md5(manifest).hexdigest()
    target = remote / "files" / "md5" / mmd5[:2] / (mmd5[2:] + ".dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(manifest)
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text(
        f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = {remote_url or remote}\n")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (repo / f"{out}.dvc").write_text(
        f"outs:\n- md5: {mmd5}.dir\n  size: {total}\n  nfiles: {len(entries)}\n  hash: md5\n  path: {out}\n")
    (repo / ".gitignore").write_text(f"/{out}\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "data")
    biggest = f"{out}/d0000" if folders > 1 else out
    return Layout(repo, remote, out, mmd5, len(entries), total, biggest)
