"""After `dda upload` moves a branch, running readers see the new commit only when they ask
(`dda status` tells; a refresh is explicit, never silent under a reader)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import sidecar
from sidecar import hooks
from sidecar.sample import make_sample_repo


@pytest.fixture()
def origin(tmp_path):
    repo, remote = make_sample_repo(tmp_path / "s")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    return bare


def add_file(origin: Path, tmp: Path, name: str, data: bytes, cache: Path) -> str:
    folder = tmp / f"new-{name}"
    folder.mkdir()
    (folder / name).write_bytes(data)
    result = sidecar.upload(str(origin), [folder / name], to="data/images/cats", revision="main",
                            cache_dir=str(cache))
    return result.commit


def test_hooks_follow_the_branch_only_on_refresh(origin, tmp_path, monkeypatch):
    view = tmp_path / "view"
    info = hooks.install_hooks(str(origin), revision="main", root=view, cache_dir=tmp_path / "cache")
    try:
        target = view / "data/images/cats/fresh.bin"
        assert not os.path.exists(target)
        reader = open(view / "data/labels.csv", "rb")          # open across the refresh
        before = reader.read(10)
        new_commit = add_file(origin, tmp_path, "fresh.bin", b"new bytes", tmp_path / "upload-cache")
        assert hooks.latest_commit() == new_commit != info.commit
        assert not os.path.exists(target)                       # nothing changes by itself
        moved = hooks.refresh_hooks()
        assert moved == (info.commit, new_commit)
        assert open(target, "rb").read() == b"new bytes"
        assert hooks.hooks_installed().commit == new_commit
        assert before + reader.read() == (view / "data/labels.csv").read_bytes()
        reader.close()
        assert hooks.refresh_hooks() is None                    # nothing new
    finally:
        hooks.uninstall_hooks()
