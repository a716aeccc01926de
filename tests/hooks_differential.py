"""Reads a corpus with ordinary libraries and writes what it saw as JSON (tests/test_hooks_differential.py).

    python hooks_differential.py plain ROOT SCRATCH OUT.json          # a real checkout
    python hooks_differential.py hooks ROOT SCRATCH OUT.json CACHE    # a clone, install_hooks()

Every library is imported before install_hooks(), as a program that installs the hooks late
does (issue 15.2: references those modules bind at import must be served too). Paths in the
results are relative to ROOT / SCRATCH so that both runs compare equal; a probe that raises
records the exception's type and errno instead of its result.
"""
from __future__ import annotations

import bz2
import codecs
import csv
import filecmp
import fileinput
import glob
import gzip
import hashlib
import io
import json
import linecache
import os
import shutil
import stat
import sys
import tarfile
import tokenize
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

SKIP_TOP = {".git", ".dvc"}       # git's and DVC's own state differ between a clone and a pulled checkout


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tree_digest(top: str | Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(top):
        dirnames.sort()
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, top)] = md5(f.read())
    return out


def user_files() -> list[str]:
    """Every file a user sees under the root, relative, sorted (os.walk over '.')."""
    found = []
    for dirpath, dirnames, files in os.walk("."):
        if dirpath == ".":
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
        found += [os.path.normpath(os.path.join(dirpath, f)) for f in files]
    return sorted(found)


# ------------------------------------------------------------------------------------------------
# probes: each returns something JSON can hold

def p_walk() -> Any:
    out = []
    for dirpath, dirnames, files in os.walk("."):
        if dirpath == ".":
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
        dirnames.sort()
        out.append([dirpath, sorted(dirnames), sorted(files)])
    return out


def p_open() -> Any:
    out = {}
    for rel in user_files():
        with open(rel, "rb") as f:
            out[rel] = md5(f.read())
        with io.open(rel, "rb", buffering=0) as f:
            assert md5(f.readall()) == out[rel]
    return out


def p_stat() -> Any:
    out = {}
    for rel in user_files() + ["data", "data/imgs", "data/imgs/thumbs", "data/missing", "data/imgs/missing.png"]:
        try:
            st = os.stat(rel)
            info: Any = [st.st_size if stat.S_ISREG(st.st_mode) else None, stat.S_ISREG(st.st_mode),
                         stat.S_ISDIR(st.st_mode)]
        except FileNotFoundError:
            info = "ENOENT"
        out[rel] = [info, os.path.exists(rel), os.path.isfile(rel), os.path.isdir(rel), os.path.lexists(rel),
                    os.access(rel, os.R_OK), os.path.getsize(rel) if os.path.isfile(rel) else None]
    return out


def p_pathlib() -> Any:
    data = Path("data")
    entries = [[p.as_posix(), p.is_file(), p.is_dir(), p.stat().st_size if p.is_file() else None]
               for p in sorted(data.rglob("*"))]
    contents = {p.as_posix(): md5(p.read_bytes()) for p in sorted(data.rglob("*")) if p.is_file()}
    root = Path.cwd()
    return {"rglob": entries, "read_bytes": contents,
            "glob": sorted(p.as_posix() for p in data.glob("*/*.png")),
            "abs_glob": sorted(p.relative_to(root).as_posix() for p in (root / "data").glob("**/*.npy")),
            "iterdir": sorted(p.name for p in (data / "imgs").iterdir()),
            "text": (data / "text/notes.txt").read_text(encoding="utf-8"),
            "walk": sorted([str(d), sorted(dn), sorted(f)] for d, dn, f in data.walk()) if hasattr(Path, "walk") else None,
            "resolve": Path("data/imgs/001.png").resolve().relative_to(root).as_posix(),
            "exists": [Path("data/imgs").exists(), Path("data/nope").exists(), Path("data/table.csv").is_file()]}


def p_glob() -> Any:
    return {"recursive": sorted(glob.glob("data/**", recursive=True)),
            "pattern": sorted(glob.glob("data/*/*.png")),
            "iglob": sorted(glob.iglob("data/**/*.csv*", recursive=True)),
            "root_dir": sorted(glob.glob("*/*", root_dir="data")),
            "hidden": sorted(glob.glob("data/**/.*", recursive=True))}


def p_listdir_scandir() -> Any:
    out = {}
    for dirpath, dirnames, _ in os.walk("data"):
        with os.scandir(dirpath) as it:
            scanned = sorted([e.name, e.path, e.is_dir(), e.is_file(), e.is_symlink(),
                              e.stat().st_size if e.is_file() else None] for e in it)
        out[dirpath] = [sorted(os.listdir(dirpath)), sorted(os.listdir(os.fsencode(dirpath))) == sorted(
            os.fsencode(n) for n in os.listdir(dirpath)), scanned]
    return out


def p_shutil(scratch: Path) -> Any:
    shutil.copytree("data", scratch / "copytree")
    shutil.copyfile("data/table.csv", scratch / "copyfile.csv")
    shutil.copy2("data/imgs/001.png", scratch / "copy2.png")
    shutil.copy("data/arrays/values.npy", scratch)
    shutil.unpack_archive("data/archives/bundle.tar", scratch / "unpacked-tar")
    shutil.unpack_archive("data/archives/bundle.zip", scratch / "unpacked-zip")
    archive = shutil.make_archive(str(scratch / "made"), "zip", root_dir="data", base_dir="imgs")
    with zipfile.ZipFile(archive) as z:
        made = sorted([i.filename, md5(z.read(i))] for i in z.infolist())
    return {"copytree": tree_digest(scratch / "copytree"),
            "copyfile": md5((scratch / "copyfile.csv").read_bytes()),
            "copy2": [md5((scratch / "copy2.png").read_bytes()), os.path.getsize(scratch / "copy2.png")],
            "copy": md5((scratch / "values.npy").read_bytes()),
            "unpack_tar": tree_digest(scratch / "unpacked-tar"), "unpack_zip": tree_digest(scratch / "unpacked-zip"),
            "make_archive": made, "disk_usage_copy": shutil.disk_usage(scratch / "copytree").total > 0}


def p_pil() -> Any:
    out = {}
    for path in sorted(glob.glob("data/imgs/**/*.png", recursive=True)):
        with Image.open(path) as im:
            im.load()
            out[path] = [list(im.size), im.mode, md5(im.tobytes())]
    im = Image.open(Path("data/imgs/002.png"))
    out["pathlib"] = [list(im.size), md5(im.tobytes())]
    return out


def p_numpy() -> Any:
    arr = np.load("data/arrays/values.npy")
    table = np.loadtxt("data/table.csv", delimiter=",", skiprows=1, usecols=(0, 2))
    with open("data/arrays/values.npy", "rb") as f:
        again = np.load(f)
    return {"load": [str(arr.dtype), list(arr.shape), md5(arr.tobytes())], "file_object": md5(again.tobytes()),
            "loadtxt": [list(table.shape), round(float(table.sum()), 6)],
            "genfromtxt": list(np.genfromtxt("data/table.csv", delimiter=",", names=True).shape)}


def p_pandas() -> Any:
    frame = pd.read_csv("data/table.csv")
    gz = pd.read_csv("data/archives/table.csv.gz")
    meta = pd.read_json("data/text/meta.json", typ="series")
    return {"read_csv": [list(frame.shape), list(frame.columns), md5(frame.to_csv(index=False).encode())],
            "read_csv_gz": md5(gz.to_csv(index=False).encode()), "read_json": sorted(meta.index),
            "same": bool(frame.equals(gz))}


def p_tarfile(scratch: Path) -> Any:
    with tarfile.open("data/archives/bundle.tar") as tar:
        names = sorted(tar.getnames())
        members = {m.name: md5(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}
        tar.extractall(scratch / "tar-extracted", filter="data") if hasattr(tarfile, "data_filter") else \
            tar.extractall(scratch / "tar-extracted")
    with tarfile.open(Path("data/archives/bundle.tar"), "r:") as tar:
        again = sorted(tar.getnames())
    return {"names": names, "members": members, "extracted": tree_digest(scratch / "tar-extracted"),
            "pathlike": again == names, "is_tarfile": tarfile.is_tarfile("data/archives/bundle.tar")}


def p_zipfile() -> Any:
    with zipfile.ZipFile("data/archives/bundle.zip") as z:
        names = sorted(z.namelist())
        members = {n: md5(z.read(n)) for n in names if not n.endswith("/")}
        test = z.testzip()
    with zipfile.ZipFile(Path("data/archives/bundle.zip")).open("a.txt") as f:
        first = f.read().decode()
    return {"names": names, "members": members, "testzip": test, "first": first,
            "is_zipfile": zipfile.is_zipfile("data/archives/bundle.zip"),
            "path": sorted(p.name for p in zipfile.Path("data/archives/bundle.zip").iterdir())}


def p_compressed() -> Any:
    with gzip.open("data/archives/table.csv.gz") as f:
        gz = md5(f.read())
    with gzip.open("data/archives/table.csv.gz", "rt") as f:
        lines = sum(1 for _ in f)
    with bz2.open("data/archives/notes.txt.bz2", "rt", encoding="utf-8") as f:
        bz = f.read()
    return {"gzip": gz, "gzip_lines": lines, "gzip_file": md5(gzip.GzipFile("data/archives/table.csv.gz").read()),
            "bz2": md5(bz.encode()), "bz2_file": md5(bz2.BZ2File("data/archives/notes.txt.bz2").read())}


def p_text() -> Any:
    with open("data/table.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open("data/text/meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    with fileinput.input(["data/text/notes.txt", "data/table.csv"], encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    with codecs.open("data/text/notes.txt", encoding="utf-8") as f:
        via_codecs = f.read()
    with tokenize.open("data/text/notes.txt") as f:
        via_tokenize = f.readline()
    linecache.clearcache()
    return {"csv": [len(rows), rows[0], rows[-1]], "json": meta, "fileinput": lines, "codecs": md5(via_codecs.encode()),
            "tokenize": via_tokenize, "linecache": linecache.getline(os.path.abspath("data/text/notes.txt"), 2),
            "empty": open("data/text/empty.txt", "rb").read().decode(),
            "filecmp": [filecmp.cmp("data/table.csv", "data/text/table_copy.csv", shallow=False),
                        filecmp.cmp("data/table.csv", "data/text/notes.txt", shallow=False)],
            "dircmp": sorted(filecmp.dircmp("data/imgs", "data/imgs").common)}


def p_chdir() -> Any:
    """Issue 15.1: a relative life inside a directory that, in the clone, exists only in the repository."""
    root = os.getcwd()
    os.chdir("data/imgs")
    try:
        rel = lambda p: os.path.relpath(p, root)  # noqa: E731
        with open("002.png", "rb") as f:
            data = md5(f.read())
        with Image.open("002.png") as im:
            size = list(im.size)
        out = {"getcwd": rel(os.getcwd()), "getcwdb": rel(os.fsdecode(os.getcwdb())), "Path.cwd": rel(Path.cwd()),
               "abspath": rel(os.path.abspath("002.png")), "realpath": rel(os.path.realpath("002.png")),
               "resolve": rel(Path("002.png").resolve()), "absolute": rel(Path("002.png").absolute()),
               "open": data, "pil": size, "listdir": sorted(os.listdir()), "listdir_dot": sorted(os.listdir(".")),
               "scandir": sorted(e.name for e in os.scandir()), "glob": sorted(glob.glob("*.png")),
               "walk": sorted(os.path.join(d, f) for d, _, fs in os.walk(".") for f in fs),
               "iterdir": sorted(p.name for p in Path().iterdir()), "isfile": os.path.isfile("thumbs/004.png")}
        os.chdir("thumbs")
        out["deeper"] = [rel(os.getcwd()), md5(Path("004.png").read_bytes())]
        os.chdir("..")
        out["up"] = rel(os.getcwd())
        return out
    finally:
        os.chdir(root)


PROBES: dict[str, Callable[..., Any]] = {
    "walk": p_walk, "open": p_open, "stat": p_stat, "pathlib": p_pathlib, "glob": p_glob,
    "listdir_scandir": p_listdir_scandir, "shutil": p_shutil, "pil": p_pil, "numpy": p_numpy, "pandas": p_pandas,
    "tarfile": p_tarfile, "zipfile": p_zipfile, "gzip_bz2": p_compressed, "text": p_text, "chdir": p_chdir,
}


def main(argv: list[str]) -> None:
    mode, root, scratch, out = argv[:4]
    os.chdir(root)
    if mode == "hooks":
        from sidecar.hooks import install_hooks

        install_hooks(cache_dir=argv[4])
    results: dict[str, Any] = {"python": "%d.%d" % sys.version_info[:2]}
    for name, probe in PROBES.items():
        where = Path(scratch) / name
        try:
            if "scratch" in probe.__code__.co_varnames[:probe.__code__.co_argcount]:
                where.mkdir(parents=True)
                results[name] = probe(where)
            else:
                results[name] = probe()
        except Exception as exc:  # noqa: BLE001 - recorded, compared with the other run
            results[name] = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
