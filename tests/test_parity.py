"""Differential test: every corpus shape, read through dda, looks exactly like
`git clone` + `dvc pull` (paths, types, sizes, exec bits, symlink targets, bytes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus import DVC2_SHAPES, SHAPES, build_shape, reference_listing
from repos import dvc2_bin

DDA = str(Path(sys.executable).parent / "dda")
CASES = [(n, "3") for n in SHAPES] + [(n, "2") for n in DVC2_SHAPES]


def dda(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_REMOTE")}
    env["DDA_CACHE_DIR"] = str(cache)
    proc = subprocess.run([DDA, *args], capture_output=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-dvc{v}" for n, v in CASES])
def shape(request, tmp_path_factory):
    name, version = request.param
    if version == "2" and not dvc2_bin():
        pytest.skip("DVC 2 not installed")
    return build_shape(name, tmp_path_factory.mktemp("corpus"), version)


def _cli_listing(shape, cache: Path) -> dict[str, dict]:
    out = dda("ls", str(shape.repo), "-R", "--json", cache=cache).stdout.decode()
    found = {}
    for line in out.splitlines():
        item = json.loads(line)
        if item["kind"] == "dir":
            found[item["path"]] = {"type": "dir"}
        elif "target" in item:
            found[item["path"]] = {"type": "symlink", "target": item["target"]}
        else:
            found[item["path"]] = {"type": "file", "size": item["size"], "exec": item["exec"]}
    return found


def test_cli_listing_matches_checkout(shape, tmp_path):
    assert _cli_listing(shape, tmp_path / "cache") == reference_listing(shape.reference)


def test_cli_bytes_match_checkout(shape, tmp_path):
    cache = tmp_path / "cache"
    got = tmp_path / "got"
    dda("get", str(shape.repo), ".", "-o", str(got), cache=cache)
    expected = reference_listing(shape.reference)
    # files, symlinks and empty folders (a submodule's path, an empty tracked directory), as a checkout
    assert reference_listing(got) == expected
    for path, item in expected.items():
        if item["type"] == "file":
            assert (got / path).read_bytes() == (shape.reference / path).read_bytes(), path


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse")
def test_mount_matches_checkout(shape, tmp_path, mp):
    from mounting import MountThread
    from sidecar.config import load_config

    config = load_config({"repo": str(shape.repo), "cache_dir": str(tmp_path / "cache")}, env={})
    with MountThread(config, mp):
        listing = reference_listing(mp)
        assert listing == reference_listing(shape.reference)
        for path, item in listing.items():
            if item["type"] == "file":
                assert (mp / path).read_bytes() == (shape.reference / path).read_bytes(), path


def test_cat_names_with_backslashes(tmp_path_factory, tmp_path):
    """13.7: `dda cat` of a git file and a tracked file whose names hold backslashes."""
    shape = build_shape("names", tmp_path_factory.mktemp("corpus"))
    cache = tmp_path / "cache"
    for base in ("tracked", "plain"):
        for name in ("back\\slash.txt", "sub\\dir\\deep.txt"):
            got = dda("cat", str(shape.repo), f"{base}/{name}", cache=cache).stdout
            assert got == (shape.reference / base / name).read_bytes()
    listing = dda("ls", str(shape.repo), "tracked", cache=cache).stdout.decode()
    assert "tracked/back\\slash.txt" in listing and "tracked/sub\\dir\\deep.txt" in listing


HOOKS_SCRIPT = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[4])
from sidecar import install_hooks
from corpus import reference_listing
install_hooks(sys.argv[1], root=sys.argv[2], cache_dir=sys.argv[3])
import os
_readlink = os.readlink
def readlink(path, *a, **k):
    try:
        return _readlink(path, *a, **k)
    except OSError:
        return "<readlink failed>"
os.readlink = readlink
listing = reference_listing(__import__("pathlib").Path(sys.argv[2]))
digests = {p: hashlib.md5(open(sys.argv[2] + "/" + p, "rb").read()).hexdigest()
           for p, item in listing.items() if item["type"] == "file"}
print(json.dumps({"listing": listing, "digests": digests}))
"""


def test_hooks_match_checkout(shape, tmp_path):
    """The in-process hooks (install_hooks) show the same tree and bytes as the checkout."""
    root = tmp_path / "root"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    proc = subprocess.run([sys.executable, "-c", HOOKS_SCRIPT, str(shape.repo), str(root), str(tmp_path / "cache"),
                           str(Path(__file__).parent)], capture_output=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    got = json.loads(proc.stdout.decode().splitlines()[-1])
    expected = reference_listing(shape.reference)
    assert got["listing"] == expected      # symlink targets included (os.readlink is hooked)
    import hashlib
    assert got["digests"] == {p: hashlib.md5((shape.reference / p).read_bytes()).hexdigest()
                              for p, item in expected.items() if item["type"] == "file"}


def _objects(remote: Path, md5: str) -> list[Path]:
    return list(remote.rglob(f"{md5[2:]}*"))


def test_import_url_read_from_its_source_when_the_remote_lacks_it(tmp_path_factory, tmp_path):
    """#13.3 import-url, compared honestly: DVC 3's `dvc pull` reads an import-url output from
    the DVC remote only (the source only for `--no-download` files, see the import_url shape).
    With the object gone from the remote, `dvc pull` fails for it; dda reads the recorded
    source, verified against the .dvc's md5, and reports what neither can give (exit 3)."""
    import shutil
    import yaml
    from repos import DVC3_BIN, _env, _run

    shape = build_shape("import_url", tmp_path_factory.mktemp("corpus"))
    root, env = shape.repo.parent, _env(shape.repo.parent)
    remote = root / "remotes" / "default"
    # A --no-download directory import: DVC 3.67's pull checks out its folders, none of its files.
    _run([DVC3_BIN, "import-url", "-q", "--no-download", "../src/raw", "lazydir"], shape.repo, env)
    _run(["git", "add", "-A"], shape.repo, env)
    _run(["git", "commit", "-q", "-m", "lazy dir"], shape.repo, env)
    table = yaml.safe_load((shape.repo / "table.csv.dvc").read_text())["outs"][0]["md5"]
    raw = yaml.safe_load((shape.repo / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    for path in _objects(remote, table) + _objects(remote, raw.removesuffix(".dir")):
        path.unlink()
    clone = root / "clone"    # beside the repository: `../src` is the source from there too
    _run(["git", "clone", "-q", str(shape.repo), str(clone)], root, env)
    pull = subprocess.run([DVC3_BIN, "pull", "-q"], cwd=clone, env=env, capture_output=True)
    assert pull.returncode != 0 and not (clone / "table.csv").exists()   # DVC 3 does not use the source
    assert (clone / "lazy.txt").read_bytes() == (root / "src" / "lazy.txt").read_bytes()   # it does here
    _run([DVC3_BIN, "pull", "-q", "lazydir.dvc"], clone, env)
    assert (clone / "lazydir").is_dir() and not [p for p in (clone / "lazydir").rglob("*") if p.is_file()]

    cache = tmp_path / "cache"
    proc = dda("ls", str(shape.repo), "-R", cache=cache, check=False)
    assert proc.returncode == 3, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "data/raw: unavailable" in err and "lazydir: unavailable" in err and "table.csv" not in err
    assert "--no-download" in err
    source = root / "src" / "table.csv"
    assert dda("cat", str(shape.repo), "table.csv", cache=cache).stdout == source.read_bytes()
    assert dda("cat", str(shape.repo), "lazy.txt", cache=cache).stdout == (root / "src" / "lazy.txt").read_bytes()
    # A source that changed since the import is never served.
    source.write_text("a,b\n1,3\n")
    bad = dda("cat", str(shape.repo), "table.csv", cache=tmp_path / "cache2", check=False)
    assert bad.returncode != 0 and bad.stdout == b"" and b"table.csv" in bad.stderr
    # Neither on the remote nor at the source: reported at its path, the rest still reads.
    source.unlink()
    gone = dda("ls", str(shape.repo), cache=tmp_path / "cache3", check=False)
    assert gone.returncode == 3 and b"table.csv: unavailable" in gone.stderr and b"missing at its source" in gone.stderr
    assert dda("cat", str(shape.repo), "direct.txt", cache=tmp_path / "cache3").stdout == b"straight to the remote\n"
    # dda upload never adds to an import-url output (dvc add would refuse it too).
    (tmp_path / "new.txt").write_text("new\n")
    up = dda("upload", str(shape.repo), str(tmp_path / "new.txt"), "--to", "data/raw", cache=cache, check=False)
    assert up.returncode != 0 and b"imported from a URL" in up.stderr
    shutil.rmtree(root / "src")


def test_repo_import_no_download_read_from_the_source_repository(tmp_path_factory, tmp_path):
    """`dvc import --no-download` records no md5; DVC 3.67's `dvc pull` crashes on it
    ("unexpected error"), so the reference is the same source path imported normally in the
    `imports` shape: dda takes the md5 from the source repository's output at `rev_lock`."""
    from repos import DVC3_BIN, _env, _run

    shape = build_shape("imports", tmp_path_factory.mktemp("corpus"))
    env = _env(shape.repo.parent)
    source = shape.repo.parent / "source"
    _run([DVC3_BIN, "import", "-q", "--no-download", str(source), "datasets/cats", "-o", "lazy_cats"], shape.repo, env)
    _run([DVC3_BIN, "import", "-q", "--no-download", str(source), "datasets/one.txt", "-o", "lazy_one.txt"],
         shape.repo, env)
    _run([DVC3_BIN, "import", "-q", "--no-download", str(source), "datasets/cats/a.txt", "-o", "part.txt"],
         shape.repo, env)
    _run(["git", "add", "-A"], shape.repo, env)
    _run(["git", "commit", "-q", "-m", "lazy imports"], shape.repo, env)
    assert "md5:" not in (shape.repo / "lazy_one.txt.dvc").read_text().split("outs:")[1]
    cache = tmp_path / "cache"
    proc = dda("ls", str(shape.repo), "-R", "--json", cache=cache, check=False)
    assert proc.returncode == 3 and b"part.txt: unavailable" in proc.stderr   # inside a directory output
    listing = {json.loads(line)["path"]: json.loads(line) for line in proc.stdout.decode().splitlines()}
    expected = reference_listing(shape.reference)
    for rel, item in expected.items():
        if rel.startswith("cats/") and item["type"] == "file":
            got = listing["lazy_" + rel]
            assert (got["size"], got["exec"]) == (item["size"], item["exec"])
            data = dda("cat", str(shape.repo), "lazy_" + rel, cache=cache).stdout
            assert data == (shape.reference / rel).read_bytes()
    assert dda("cat", str(shape.repo), "lazy_one.txt", cache=cache).stdout == \
        (shape.reference / "inputs" / "one.txt").read_bytes()


def test_get_of_a_folder_makes_its_empty_folders(tmp_path_factory, tmp_path):
    """`dda get` of a folder holding only a submodule's path, and of an empty tracked
    directory itself: the empty folders are made, as a checkout has them."""
    shape = build_shape("names", tmp_path_factory.mktemp("corpus"))
    cache = tmp_path / "cache"
    dda("get", str(shape.repo), "vendor", "-o", str(tmp_path / "v"), cache=cache)
    assert reference_listing(tmp_path / "v") == {"lib": {"type": "dir"}}
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "old.txt").write_text("kept\n")       # a get adds, it never empties a folder
    dda("get", str(shape.repo), "nothing", "-o", str(tmp_path / "n"), cache=cache)
    assert reference_listing(tmp_path / "n") == {"old.txt": {"type": "file", "size": 5, "exec": False}}
    dda("get", str(shape.repo), "nothing", "-o", str(tmp_path / "m"), cache=cache)
    assert (tmp_path / "m").is_dir() and list((tmp_path / "m").iterdir()) == []
