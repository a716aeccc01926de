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


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mount_shows_new_commit_and_refreshes_on_request(origin, tmp_path):
    from mounting import DDA, mounted, wait_until

    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("DDA_REPO", None)
    subprocess.run([DDA, "mount", str(origin), str(mp), "--rev", "main", "--daemon"], env=env, check=True,
                   capture_output=True)
    try:
        cats = sorted(os.listdir(mp / "data/images/cats"))
        first = mp / "data/images/cats" / cats[0]
        reader = open(first, "rb")
        head = reader.read(100)
        old_commit = os.getxattr(mp, "user.dda.commit").decode()
        new_commit = add_file(origin, tmp_path, "fresh.bin", b"brand new", tmp_path / "upload-cache")
        status = subprocess.run([DDA, "status", str(mp)], capture_output=True, text=True).stdout
        assert f"the branch has moved to {new_commit}" in status
        assert "fresh.bin" not in os.listdir(mp / "data/images/cats")     # not silently
        out = subprocess.run([DDA, "refresh", str(mp)], capture_output=True, text=True, check=True).stdout
        assert f"{old_commit[:12]} -> {new_commit[:12]}" in out
        assert wait_until(lambda: "fresh.bin" in os.listdir(mp / "data/images/cats"), 5)
        assert (mp / "data/images/cats/fresh.bin").read_bytes() == b"brand new"
        assert os.getxattr(mp, "user.dda.commit").decode() == new_commit
        assert head + reader.read() == first.read_bytes()                  # the open file kept reading
        reader.close()
        again = subprocess.run([DDA, "refresh", str(mp)], capture_output=True, text=True, check=True).stdout
        assert "already at the branch's tip" in again
    finally:
        subprocess.run([DDA, "unmount", str(mp)])
        wait_until(lambda: not mounted(mp), 10)
