"""The hooks' differential test (issue 15, Must work): one corpus, authored with the real DVC CLI
and pushed to a local remote, read with ordinary libraries (open, pathlib, os.walk, glob, shutil,
PIL, numpy, pandas, tarfile, zipfile, gzip, bz2, csv, json, linecache, ...) twice:

- in a real checkout (`git clone` + `dvc pull`), no hooks;
- in a clone without data, through `install_hooks()`;

on every Python at hand (this one, 3.11, and DDA_EXTRA_PYTHONS: 3.12, 3.13). Both runs must
see exactly the same thing (tests/hooks_differential.py lists the probes).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from hooks_worker import npy_bytes, png_bytes
from repos import DVC3_BIN, _env, _run
from sidecar.hooks import install_hooks, uninstall_hooks

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "hooks_differential.py"
PYTHONS = [sys.executable] + [p for p in os.environ.get("DDA_EXTRA_PYTHONS", "").split(":") if p]


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sub")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("sub/", (2023, 11, 14, 22, 13, 20)), b"")
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, (2023, 11, 14, 22, 13, 20)), data)
    return buf.getvalue()


def corpus() -> dict[str, bytes]:
    """The tracked data: images (a nested folder too), archives, an array, text, a CSV."""
    table = ("id,name,score\n" + "".join(f"{i},item{i},{(i * 37 % 101) / 7:.4f}\n" for i in range(150))).encode()
    members = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 40, "sub/c.csv": table[:200]}
    return {
        "data/imgs/001.png": png_bytes(16, 12), "data/imgs/002.png": png_bytes(8, 8),
        "data/imgs/003.png": png_bytes(20, 5), "data/imgs/thumbs/004.png": png_bytes(4, 4),
        "data/archives/bundle.tar": _tar(members), "data/archives/bundle.zip": _zip(members),
        "data/archives/table.csv.gz": gzip.compress(table, mtime=0),
        "data/archives/notes.txt.bz2": bz2.compress("línea ü\n".encode() * 300),
        "data/arrays/values.npy": npy_bytes(list(range(-500, 500, 3))),
        "data/text/notes.txt": "first line\nsecond línea\nthird\n".encode(),
        "data/text/meta.json": json.dumps({"name": "corpus", "classes": ["cat", "dog"], "n": 4}).encode(),
        "data/text/table_copy.csv": table, "data/text/empty.txt": b"", "data/text/.hidden": b"dot file\n",
        "data/table.csv": table,
    }


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory):
    """(pulled checkout, clone without data): authored with `dvc add` + `dvc push` to a local remote."""
    work = tmp_path_factory.mktemp("hooks-diff")
    env = _env(work)
    author = work / "author"
    author.mkdir()

    def run(*cmd, cwd=author):
        return _run(list(map(str, cmd)), cwd, env)

    run("git", "init", "-q", "-b", "main")
    run("git", "config", "core.autocrlf", "false")
    run(DVC3_BIN, "init", "-q")
    run(DVC3_BIN, "config", "core.analytics", "false")
    run(DVC3_BIN, "remote", "add", "-d", "store", work / "remote")
    (author / "README.md").write_text("# corpus\n")
    (author / "src").mkdir()
    (author / "src" / "train.py").write_text("print('train')\n")
    for rel, data in corpus().items():
        (author / rel).parent.mkdir(parents=True, exist_ok=True)
        (author / rel).write_bytes(data)
    run(DVC3_BIN, "add", "data/imgs", "data/archives", "data/arrays", "data/text", "data/table.csv")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "corpus")
    run(DVC3_BIN, "push", "-q")
    checkout, clone = work / "checkout", work / "clone"
    run("git", "clone", "-q", author, checkout, cwd=work)
    run(DVC3_BIN, "pull", "-q", cwd=checkout)
    run("git", "clone", "-q", author, clone, cwd=work)
    assert (checkout / "data/imgs/002.png").is_file() and not (clone / "data/imgs").exists()
    return checkout, clone, work


def _read(python: str, mode: str, root: Path, work: Path, tag: str) -> dict:
    scratch, out = work / f"scratch-{tag}-{mode}", work / f"{tag}-{mode}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'tests'}"
    args = [python, str(WORKER), mode, str(root), str(scratch), str(out)]
    if mode == "hooks":
        args.append(str(work / f"cache-{tag}"))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: Path(p).parent.parent.name)
def test_hooks_read_what_a_checkout_has(checkouts, python):
    checkout, clone, work = checkouts
    tag = f"py{abs(hash(python)) % 10**6}"
    want = _read(python, "plain", checkout, work, tag)
    got = _read(python, "hooks", clone, work, tag)
    assert want["python"] in ("3.11", "3.12", "3.13")
    # the checkout side is sound: every probe ran, on the bytes DVC stored
    errors = {k: v for k, v in want.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    expected = {k: hashlib.md5(v).hexdigest() for k, v in corpus().items()}
    assert {k: v for k, v in want["open"].items()
            if k.startswith("data/") and not k.endswith(".dvc") and k != "data/.gitignore"} == expected
    assert want["chdir"]["getcwd"] == "data/imgs" and want["chdir"]["open"] == expected["data/imgs/002.png"]
    # the hooks side sees the same, probe by probe
    differ = sorted(probe for probe in want if got.get(probe) != want[probe])
    assert not differ, f"Python {want['python']}: {differ} differ; hooks saw " + json.dumps(
        {probe: got.get(probe) for probe in differ})[:3000]


def test_dvc_pull_after_chdir_through_the_hooks(checkouts, tmp_path, monkeypatch):
    """The folders os.chdir() created through the hooks (issue 15.1) leave the clone a clone
    DVC is happy with: a later `dvc pull` fills them and `dvc status` is clean."""
    _, clone, work = checkouts
    mine = tmp_path / "clone"
    shutil.copytree(clone, mine, symlinks=True)
    monkeypatch.chdir(mine)
    for var in [v for v in os.environ if v.startswith("DDA_")]:
        monkeypatch.delenv(var)
    install_hooks(cache_dir=tmp_path / "cache")
    try:
        os.chdir("data/imgs/thumbs")
        assert open("004.png", "rb").read() == corpus()["data/imgs/thumbs/004.png"]
    finally:
        uninstall_hooks()
    assert sorted(os.listdir(mine / "data/imgs")) == ["thumbs"] and os.listdir(".") == []
    env = _env(work)
    _run([DVC3_BIN, "pull", "-q"], mine, env)
    status = _run([DVC3_BIN, "status"], mine, env).stdout
    assert "up to date" in status, status
    assert (mine / "data/imgs/thumbs/004.png").read_bytes() == corpus()["data/imgs/thumbs/004.png"]
