"""Issue 14 item 3 and must-work 1 (snapshot half), issue 13 must-work 2.

Every repository path is normalized once at the snapshot: absolute and escaping paths
are rejected there with one line naming the file and field, nothing hangs; and one bad
output is reported once and shown at its path while the rest of the revision works.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sidecar.errors import DvcFileError
from sidecar.sample import make_sample_repo
from sidecar.snapshot.build import compose_tree
from sidecar.snapshot.dvcfiles import parse_dvc_file, parse_dvc_lock, parse_dvc_yaml, parse_manifest
from sidecar.snapshot.git import GitEntry
from sidecar.snapshot.tree import Entry, Tree

DDA = str(Path(sys.executable).parent / "dda")
MD5 = "0123456789abcdef0123456789abcdef"
PARTIAL = 3


def dda(*args, cache, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    env["DDA_CACHE_DIR"] = str(cache)
    started = time.monotonic()
    proc = subprocess.run([DDA, *args], capture_output=True, env=env, timeout=timeout)
    proc.seconds = time.monotonic() - started
    return proc


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture()
def sample(tmp_path):
    repo, remote = make_sample_repo(tmp_path / "s", images=6, sizes=(10, 50))
    return repo, remote, tmp_path / "cache"


def _commit(repo: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "hostile")


# -- pure: every field, every way out ------------------------------------------------------------

@pytest.mark.parametrize("text,field", [
    (f"wdir: /etc\nouts:\n- md5: {MD5}\n  path: passwd\n", "wdir"),
    (f"wdir: ../..\nouts:\n- md5: {MD5}\n  path: x\n", "wdir"),
    (f"outs:\n- md5: {MD5}\n  path: /etc/passwd\n", "path"),
    (f"outs:\n- md5: {MD5}\n  path: ../../../x\n", "path"),
    (f"outs:\n- md5: {MD5}\n  path: .git/hooks/post-checkout\n", "path"),
    (f"outs:\n- md5: {MD5}\n  path: sub/../../../x\n", "path"),
    (f"wdir: ..\nouts:\n- md5: {MD5}\n  path: .\n", "path"),
    (f"outs:\n- md5: {MD5}\n  path: 7\n", "path"),
])
def test_dvc_file_paths_are_contained(text, field):
    with pytest.raises(DvcFileError) as err:
        parse_dvc_file(text.encode(), "sub/x.dvc")
    message = str(err.value)
    assert message.startswith("sub/x.dvc") and (f"{field}" in message or "repository itself" in message)
    assert "\n" not in message


def test_subrepo_outputs_stay_in_their_subrepo():
    with pytest.raises(DvcFileError, match="outside the DVC repository at audio/"):
        parse_dvc_file(f"outs:\n- md5: {MD5}\n  path: ../text/x\n".encode(), "audio/x.dvc", root="audio")


def test_stage_wdir_and_lock_paths_are_contained():
    with pytest.raises(DvcFileError, match="wdir"):
        parse_dvc_yaml(b"stages:\n  s:\n    wdir: /abs\n    cmd: x\n", "dvc.yaml")
    with pytest.raises(DvcFileError, match="wdir"):
        parse_dvc_yaml(b"stages:\n  s:\n    wdir: ../..\n    cmd: x\n", "data/dvc.yaml")
    stages = parse_dvc_yaml(b"stages:\n  s:\n    wdir: ../\n    cmd: x\n    outs:\n    - data/o\n", "data/dvc.yaml")
    lock = f"schema: '2.0'\nstages:\n  s:\n    cmd: x\n    outs:\n    - path: ../../o\n      md5: {MD5}\n".encode()
    with pytest.raises(DvcFileError, match="points outside"):
        parse_dvc_lock(lock, "data/dvc.lock", stages)


def test_lock_paths_are_relative_to_the_stage_wdir_and_cache_false_stays_in_git():
    stages = parse_dvc_yaml(b"stages:\n  derive:\n    wdir: ../\n    cmd: x\n    outs:\n    - data/derived.txt\n"
                            b"    metrics:\n    - metrics.json:\n        cache: false\n", "data/dvc.yaml")
    lock = (f"schema: '2.0'\nstages:\n  derive:\n    cmd: x\n    outs:\n    - path: data/derived.txt\n"
            f"      md5: {MD5}\n      size: 3\n    - path: metrics.json\n      md5: {MD5}\n      size: 8\n").encode()
    assert [o.path for o in parse_dvc_lock(lock, "data/dvc.lock", stages)] == ["data/derived.txt"]


@pytest.mark.parametrize("relpath", ["/etc/passwd", "../x", "a/../../x", ".git/config", ".", ""])
def test_manifest_relpaths_are_contained(relpath):
    with pytest.raises(DvcFileError, match="entry 0"):
        parse_manifest(json.dumps([{"md5": MD5, "relpath": relpath}]).encode(), "d.dvc: manifest")


def test_backslash_is_an_ordinary_character():
    entries = parse_manifest(json.dumps([{"md5": MD5, "relpath": "sub\\dir\\deep.txt"}]).encode(), "m")
    assert entries[0].relpath == "sub\\dir\\deep.txt"
    tree = Tree({"a\\b": Entry("a\\b", "git", 0o100644, 1, "x")})
    assert tree.listdir("") == ["a\\b"] and tree.get("a\\b") is not None


def test_git_tree_names_that_escape_are_skipped_and_reported():
    entries = [GitEntry("ok.txt", 0o100644, "a" * 40, "blob", 1), GitEntry("../evil", 0o100644, "b" * 40, "blob", 1),
               GitEntry("x/.git/config", 0o100644, "c" * 40, "blob", 1), GitEntry("vendor", 0o160000, "d" * 40,
                                                                                 "commit", 0)]
    tree = compose_tree(entries, [], {})
    assert sorted(tree.files) == ["ok.txt"]
    assert tree.dirs["vendor"] == []          # a submodule: an empty folder, as in a clone
    assert len(tree.problems) == 2 and all("git tree" in p.cause for p in tree.problems)


def test_symlinks_are_followed_only_inside_the_tree():
    link = lambda p, t: Entry(p, "git", 0o120000, len(t), "x", target=t)  # noqa: E731
    files = {"d/f": Entry("d/f", "git", 0o100644, 1, "y"), "in": link("in", "d/f"), "up": link("up", "../../etc"),
             "abs": link("abs", "/etc/passwd"), "loop1": link("loop1", "loop2"), "loop2": link("loop2", "loop1"),
             "dl": link("dl", "d")}
    tree = Tree(files)
    assert tree.resolve("in") == "d/f" and tree.resolve("dl/f") == "d/f"
    assert tree.resolve("up") is None and tree.resolve("abs") is None
    with pytest.raises(OSError) as err:
        tree.resolve("loop1")
    assert err.value.errno == errno.ELOOP


# -- the CLI: nothing hangs, one line names file and field, the rest still works ----------------

@pytest.mark.parametrize("wdir", ["/some/abs/path", "/", "../../..", "//x"])
def test_absolute_or_escaping_wdir_fails_fast_and_alone(sample, wdir):
    repo, _, cache = sample
    _commit(repo, {"evil.dvc": yaml.safe_dump({"wdir": wdir, "outs": [{"md5": MD5, "path": "x"}]})})
    proc = dda("ls", str(repo), "-R", cache=cache)
    assert proc.seconds < 30
    assert proc.returncode == PARTIAL, proc.stderr
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "evil.dvc" in err and "wdir" in err and "Traceback" not in err
    listing = proc.stdout.decode()
    assert "data/labels.csv" in listing and "broken" in listing
    assert dda("cat", str(repo), "data/labels.csv", cache=cache).returncode == 0
    cat = dda("cat", str(repo), "evil", cache=cache)
    assert cat.returncode not in (0, PARTIAL) and b"evil.dvc" in cat.stderr and cat.stdout == b""


def test_missing_manifest_is_one_broken_output(sample, tmp_path):
    repo, remote, cache = sample
    md5 = yaml.safe_load((repo / "data/images.dvc").read_text())["outs"][0]["md5"][:-4]
    (remote / "files/md5" / md5[:2] / (md5[2:] + ".dir")).unlink()
    proc = dda("ls", str(repo), "-R", "--json", cache=cache)
    assert proc.returncode == PARTIAL
    err = proc.stderr.decode().splitlines()
    assert len(err) == 1 and "data/images" in err[0] and "missing" in err[0]
    items = {json.loads(l)["path"]: json.loads(l)["kind"] for l in proc.stdout.splitlines()}
    assert items["data/images"] == "broken" and items["data/labels.csv"] == "dvc" and items["README.md"] == "git"
    cat = dda("cat", str(repo), "data/images/cats/cat_00001.jpg", cache=cache)
    assert cat.returncode == 1 and b"data/images: unavailable" in cat.stderr and b"missing" in cat.stderr
    assert dda("cat", str(repo), "data/labels.csv", cache=cache).returncode == 0
    # dda get of the whole revision writes everything else and names the broken output (exit 3)
    out = tmp_path / "got"
    got = dda("get", str(repo), ".", "-o", str(out), cache=cache)
    assert got.returncode == PARTIAL, got.stderr
    assert b"data/images: unavailable" in got.stderr and b"Traceback" not in got.stderr
    assert (out / "data/labels.csv").is_file() and (out / "README.md").is_file()
    assert not (out / "data/images").exists()
    # listing only a healthy folder says nothing about the broken one
    assert dda("ls", str(repo), "src" if (repo / "src").exists() else "data/labels.csv", cache=cache).returncode == 0


def test_malformed_dvc_file_is_shown_at_its_path(sample):
    repo, _, cache = sample
    _commit(repo, {"data/labels.csv.dvc": "outs:\n- md5: 1234\n  path: labels.csv\n"})
    proc = dda("ls", str(repo), "data", cache=cache)
    assert proc.returncode == PARTIAL
    assert "broken" in proc.stdout.decode() and "data/labels.csv" in proc.stdout.decode()
    assert "data/images/" in proc.stdout.decode()


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse")
def test_mount_serves_the_rest_and_eio_inside_a_broken_output(sample, mp, tmp_path):
    from mounting import MountThread
    from sidecar.config import Config

    repo, remote, cache = sample
    md5 = yaml.safe_load((repo / "data/images.dvc").read_text())["outs"][0]["md5"][:-4]
    (remote / "files/md5" / md5[:2] / (md5[2:] + ".dir")).unlink()
    _commit(repo, {"evil.dvc": yaml.safe_dump({"wdir": "/abs", "outs": [{"md5": MD5, "path": "x"}]})})
    with MountThread(Config(repo=str(repo), cache_dir=cache), mp) as m:
        assert (mp / "data/labels.csv").read_bytes().count(b"\n") == 6
        assert os.path.isdir(mp / "data/images")
        for attempt in (lambda: os.listdir(mp / "data/images"), lambda: os.stat(mp / "data/images/cats"),
                        lambda: open(mp / "evil", "rb").read()):
            with pytest.raises(OSError) as err:
                attempt()
            assert err.value.errno == errno.EIO
        status = json.loads(os.getxattr(mp, "user.dda.status"))
        assert len(status["problems"]) == 2
        assert any("data/images" in p and "missing" in p for p in status["problems"])
        assert any("evil.dvc" in p and "wdir" in p for p in status["problems"])
        assert len(m.mount.engine.problems) == 2


def test_unreachable_import_source_is_one_broken_output(tmp_path_factory, tmp_path):
    """13.3 + must-work 2: the source repository of `dvc import` is gone: only the imports
    are unavailable, each named once; everything else lists and reads."""
    import shutil

    from corpus import build_shape

    shape = build_shape("imports", tmp_path_factory.mktemp("corpus"))
    shutil.rmtree(shape.repo.parent / "source")
    shutil.rmtree(shape.repo.parent / "middle")
    proc = dda("ls", str(shape.repo), "-R", "--json", cache=tmp_path / "cache")
    assert proc.returncode == PARTIAL, proc.stderr
    err = proc.stderr.decode().splitlines()
    assert len(err) == 3 and all("unavailable" in line and "import from" in line for line in err)
    kinds = {json.loads(l)["path"]: json.loads(l)["kind"] for l in proc.stdout.splitlines()}
    assert kinds["cats"] == kinds["inputs/one.txt"] == kinds["relayed.txt"] == "broken"
    assert kinds[".dvc/config"] == "git"
    cat = dda("cat", str(shape.repo), "cats/a.txt", cache=tmp_path / "cache")
    assert cat.returncode == 1 and b"cats: unavailable" in cat.stderr and b"import from" in cat.stderr
