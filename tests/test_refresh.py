"""After `dda upload` moves a branch, running readers see the new commit only when they ask
(`dda status` tells; a refresh is explicit, never silent under a reader)."""
from __future__ import annotations

import contextlib
import hashlib
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


def test_hooks_open_file_keeps_its_content_when_the_branch_changes_it(origin, tmp_path):
    """Issue 10, failing before: in a clone without data, a file opened before refresh_hooks()
    went on with the new commit's content. A handle is pinned to the object it opened."""
    import hashlib

    import yaml

    from sidecar.remotes.base import object_path

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / "data/labels.csv").exists()                 # no data pulled
    storage = tmp_path / "s" / "storage"
    old = b""
    hooks.install_hooks(str(origin), revision="main", root=clone, cache_dir=tmp_path / "cache")
    try:
        reader = open(clone / "data/labels.csv", "rb", buffering=0)  # every read goes to the engine
        head = reader.read(10)
        old = head + open(clone / "data/labels.csv", "rb").read()[10:]
        new = b"replaced,labels\n" * 7
        md5 = hashlib.md5(new).hexdigest()
        (storage / object_path(md5, legacy=False)).parent.mkdir(parents=True, exist_ok=True)
        (storage / object_path(md5, legacy=False)).write_bytes(new)
        (clone / "data/labels.csv.dvc").write_text(yaml.safe_dump(
            {"outs": [{"md5": md5, "size": len(new), "hash": "md5", "path": "labels.csv"}]}, sort_keys=False))
        git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "commit", "-q", "-am", "other labels"], check=True)
        subprocess.run([*git, "push", "-q", "origin", "main"], check=True)
        assert hooks.refresh_hooks() is not None
        assert head + reader.read() == old                            # the old content, to its end
        reader.close()
        with open(clone / "data/labels.csv", "rb") as fresh:          # a new open: the new commit
            assert fresh.read() == new
    finally:
        hooks.uninstall_hooks()


def test_an_open_file_whose_path_becomes_a_directory_keeps_reading(origin, tmp_path):
    """README: open handles are pinned to the object they opened (a refresh never changes an
    open file). Found by the breaker with a DVC file replaced by a git directory."""
    from mounting import DDA, mounted, wait_until

    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("DDA_REPO", None)
    subprocess.run([DDA, "mount", str(origin), str(mp), "--rev", "main", "--daemon"], env=env, check=True,
                   capture_output=True)
    stack = contextlib.ExitStack()
    try:
        labels = mp / "data" / "labels.csv"
        whole = labels.read_bytes()
        reader = open(labels, "rb")
        stack.enter_context(contextlib.suppress(OSError))     # today even close() fails (EIO)
        stack.callback(reader.close)
        head = reader.read(10)
        work = tmp_path / "work"
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(work)]
        subprocess.run(["git", "clone", "-q", str(origin), str(work)], check=True)
        subprocess.run([*git, "rm", "-q", "data/labels.csv.dvc"], check=True)
        (work / "data" / ".gitignore").write_text("/images\n")
        (work / "data" / "labels.csv").mkdir()
        (work / "data" / "labels.csv" / "inner.txt").write_text("now a directory\n")
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "flip"], check=True)
        subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True)
        subprocess.run([DDA, "refresh", str(mp)], capture_output=True, text=True, check=True, env=env)
        assert head + reader.read() == whole        # the open file kept reading
        assert os.listdir(labels) == ["inner.txt"]
    finally:
        stack.close()
        subprocess.run([DDA, "unmount", str(mp)])
        if not wait_until(lambda: not mounted(mp), 10):
            subprocess.run([DDA, "unmount", "--lazy", str(mp)])    # a release still in flight
            wait_until(lambda: not mounted(mp), 10)


def test_an_open_file_keeps_its_size_when_a_refresh_changes_it(origin, tmp_path):
    """README: a refresh never changes an open file. The existing test changes a folder
    beside the open file; here the open file's own .dvc changes (another md5 and size)."""
    from mounting import DDA, mounted, wait_until

    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("DDA_REPO", None)
    subprocess.run([DDA, "mount", str(origin), str(mp), "--rev", "main", "--daemon"], env=env, check=True,
                   capture_output=True)
    stack = contextlib.ExitStack()
    try:
        labels = mp / "data" / "labels.csv"
        whole = labels.read_bytes()
        stack.enter_context(contextlib.suppress(OSError))
        reader = stack.enter_context(open(labels, "rb"))
        head = reader.read(10)
        work = tmp_path / "work"
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(work)]
        subprocess.run(["git", "clone", "-q", str(origin), str(work)], check=True)
        dvcfile = work / "data" / "labels.csv.dvc"
        dvcfile.write_text(dvcfile.read_text().replace(hashlib.md5(whole).hexdigest(), "0" * 32)
                           .replace(f"size: {len(whole)}", "size: 3"))
        subprocess.run([*git, "commit", "-qam", "other labels"], check=True)
        subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True)
        subprocess.run([DDA, "refresh", str(mp)], capture_output=True, text=True, check=True, env=env)
        assert os.fstat(reader.fileno()).st_size == len(whole)
        assert head + reader.read() == whole        # the open file kept reading
    finally:
        stack.close()
        subprocess.run([DDA, "unmount", str(mp)])
        wait_until(lambda: not mounted(mp), 10)
