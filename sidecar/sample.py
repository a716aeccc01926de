"""A small DVC 3 repository with a local remote, written without DVC installed (for `dda demo`).

The files are laid out exactly as `dvc add` + `dvc push` would: `.dvc` files with md5, size
and nfiles, a `.dir` manifest sorted by relpath, objects under files/md5/ab/cdef...
"""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import yaml

from .remotes.base import object_path


def _git(repo: Path, *args: str) -> None:
    env = {"GIT_AUTHOR_NAME": "dda demo", "GIT_AUTHOR_EMAIL": "demo@dda.invalid",
           "GIT_COMMITTER_NAME": "dda demo", "GIT_COMMITTER_EMAIL": "demo@dda.invalid", "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


def _put(remote: Path, md5: str, data: bytes, is_dir: bool = False) -> None:
    target = remote / object_path(md5, legacy=False, is_dir=is_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def make_sample_repo(workdir: Path, images: int = 48, seed: int = 7,
                     sizes: tuple[int, int] = (20_000, 120_000)) -> tuple[Path, Path]:
    """Returns (repository path, remote path)."""
    rng = random.Random(seed)
    repo, remote = workdir / "repo", workdir / "storage"
    repo.mkdir(parents=True)
    remote.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# sample dataset\nImages and labels, versioned with DVC.\n")
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text(f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = {remote}\n")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (repo / ".dvcignore").write_text("")

    manifest = []
    total = 0
    for i in range(images):
        label = "cat" if i % 2 else "dog"
        data = rng.randbytes(rng.randint(*sizes))
        md5 = hashlib.md5(data).hexdigest()
        _put(remote, md5, data)
        manifest.append({"md5": md5, "relpath": f"{label}s/{label}_{i:05d}.jpg"})
        total += len(data)
    manifest.sort(key=lambda e: e["relpath"])
    manifest_bytes = json.dumps(manifest, separators=(", ", ": ")).encode()
    dir_md5 = hashlib.md5(manifest_bytes).hexdigest()
    _put(remote, dir_md5, manifest_bytes, is_dir=True)

    labels = "".join(f"{m['relpath']},{'cat' if 'cat' in m['relpath'] else 'dog'}\n" for m in manifest).encode()
    labels_md5 = hashlib.md5(labels).hexdigest()
    _put(remote, labels_md5, labels)

    data_dir = repo / "data"
    data_dir.mkdir()
    (data_dir / ".gitignore").write_text("/images\n/labels.csv\n")
    (data_dir / "images.dvc").write_text(yaml.safe_dump({"outs": [
        {"md5": f"{dir_md5}.dir", "size": total, "nfiles": images, "hash": "md5", "path": "images"}]},
        sort_keys=False))
    (data_dir / "labels.csv.dvc").write_text(yaml.safe_dump({"outs": [
        {"md5": labels_md5, "size": len(labels), "hash": "md5", "path": "labels.csv"}]}, sort_keys=False))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "Add sample images and labels")
    _git(repo, "tag", "v1")
    return repo, remote
