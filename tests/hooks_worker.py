"""Helpers for tests/test_hooks.py: a DVC 3 repository with files real libraries read (CSV,
.npy, JSON, PNG, text), its expected content, and a picklable dataset for DataLoader workers.

Nothing here installs hooks: in spawn workers they must come back by themselves (DDA_HOOKS and
the .pth line), not through this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import zlib
from pathlib import Path

import yaml

from sidecar.remotes.base import object_path
from sidecar.sample import _git, make_sample_repo


def _put(remote: Path, md5: str, data: bytes, is_dir: bool = False) -> None:
    target = remote / object_path(md5, legacy=False, is_dir=is_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def png_bytes(width: int = 16, height: int = 12) -> bytes:
    """A real RGB PNG, written by hand (no PIL needed to make it)."""
    rows = b"".join(b"\x00" + b"".join(bytes((x * 16 % 256, y * 20 % 256, (x + y) * 8 % 256)) for x in range(width))
                    for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def npy_bytes(values: list[int]) -> bytes:
    """numpy .npy format 1.0 of a little-endian int32 vector, written by hand."""
    header = f"{{'descr': '<i4', 'fortran_order': False, 'shape': ({len(values)},), }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    return (b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")
            + struct.pack(f"<{len(values)}i", *values))


def lib_files(seed: int = 11) -> dict[str, bytes]:
    rng = random.Random(seed)
    rows = ["id,name,score"] + [f"{i},item{i},{rng.random():.6f}" for i in range(200)]
    return {
        "table.csv": ("\n".join(rows) + "\n").encode(),
        "array.npy": npy_bytes([rng.randint(-1000, 1000) for _ in range(1000)]),
        "meta.json": json.dumps({"name": "sample", "classes": ["cat", "dog"], "n": 48, "é": "ü"}).encode(),
        "image.png": png_bytes(),
        "notes.txt": "línea uno\r\nline two\r\nlast line\r\n".encode("utf-8"),
        "nested/deeper/big.bin": rng.randbytes(3 * 1024 * 1024 + 12345),
        "nested/empty.bin": b"",
    }


def make_hooks_repo(workdir: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """The sample repository plus `data/lib/` (a tracked directory of library files).
    Returns (checkout without `dvc pull`, remote, {repo path: bytes} of every DVC file)."""
    repo, remote = make_sample_repo(workdir, images=12)
    add_tracked_dir(repo, remote, "lib", lib_files(), "Add library files")
    return repo, remote, expected_dvc_files(repo, remote)


def add_tracked_dir(repo: Path, remote: Path, name: str, files: dict[str, bytes], message: str) -> None:
    """Track `data/<name>/` (as `dvc add` + `dvc push` would: objects in the remote, the .dvc
    file and the .gitignore line committed), without writing the files into the checkout."""
    manifest = []
    for rel, data in files.items():
        md5 = hashlib.md5(data).hexdigest()
        _put(remote, md5, data)
        manifest.append({"md5": md5, "relpath": rel})
    manifest.sort(key=lambda e: e["relpath"])
    body = json.dumps(manifest, separators=(", ", ": ")).encode()
    dir_md5 = hashlib.md5(body).hexdigest()
    _put(remote, dir_md5, body, is_dir=True)
    (repo / "data" / f"{name}.dvc").write_text(yaml.safe_dump({"outs": [
        {"md5": f"{dir_md5}.dir", "size": sum(map(len, files.values())), "nfiles": len(files), "hash": "md5",
         "path": name}]}, sort_keys=False))
    with open(repo / "data" / ".gitignore", "a") as f:
        f.write(f"/{name}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)


def archive_files() -> dict[str, bytes]:
    """A tar, a bzip2 file and Python-ish text: what tarfile, bz2, tokenize and linecache read."""
    import bz2
    import io
    import tarfile

    members = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 40}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return {
        "bundle.tar": buf.getvalue(),
        "notes.txt.bz2": bz2.compress("línea\n".encode() * 500),
        "script.py": b"# -*- coding: utf-8 -*-\nGREETING = 'h\xc3\xa9llo'\nprint(GREETING)\n",
    }


def expected_dvc_files(repo: Path, remote: Path) -> dict[str, bytes]:
    """What `dvc pull` would write, read straight from the remote's objects."""
    out: dict[str, bytes] = {}

    def obj(md5: str, is_dir: bool = False) -> bytes:
        return (remote / object_path(md5, legacy=False, is_dir=is_dir)).read_bytes()

    for dvcfile in (p for p in repo.rglob("*.dvc") if p.is_file()):
        base = dvcfile.parent.relative_to(repo).as_posix()
        for o in yaml.safe_load(dvcfile.read_text())["outs"]:
            path = f"{base}/{o['path']}" if base != "." else o["path"]
            if o["md5"].endswith(".dir"):
                for e in json.loads(obj(o["md5"][:-4], True)):
                    out[f"{path}/{e['relpath']}"] = obj(e["md5"])
            else:
                out[path] = obj(o["md5"])
    return out


class RepoFiles:
    """A map-style dataset (what torch.utils.data.Dataset asks for) over repository files:
    each item is read with plain open() in the worker process."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, int, str, bool, int]:
        from sidecar import hooks

        path = self.paths[index]
        with open(path, "rb") as f:
            data = f.read()
        return (path, os.path.getsize(path), hashlib.md5(data).hexdigest(), hooks.hooks_installed() is not None,
                os.getpid())
