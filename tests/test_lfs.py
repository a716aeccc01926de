"""13.6: Git LFS pointers are resolved through the LFS batch API (sha256-verified, cached),
compared with a clone made with git-lfs installed. The LFS endpoint is a small batch-API
server (upload + download, basic transfer) that the real `git lfs push` talks to."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from corpus import reference_listing
from repos import _env, _run

DDA = str(Path(sys.executable).parent / "dda")
pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="needs git-lfs (Debian package git-lfs)")


class LfsServer:
    """Objects on disk under `root`; counts downloads; `corrupt` serves wrong bytes."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.downloads = 0
        self.batches = 0
        self.corrupt = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/vnd.git-lfs+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/objects/batch"):
                    return self._json(404, {"message": "not found"})
                server.batches += 1
                base = f"http://{self.headers['Host']}/lfs/objects/"
                objects = []
                for obj in body.get("objects", []):
                    have = (server.root / obj["oid"]).exists()
                    item = {"oid": obj["oid"], "size": obj["size"]}
                    if body.get("operation") == "upload":
                        if not have:
                            item["actions"] = {"upload": {"href": base + obj["oid"]}}
                    elif have:
                        item["actions"] = {"download": {"href": base + obj["oid"]}}
                    else:
                        item["error"] = {"code": 404, "message": "object does not exist"}
                    objects.append(item)
                self._json(200, {"transfer": "basic", "objects": objects})

            def do_PUT(self):  # noqa: N802
                oid = self.path.rsplit("/", 1)[-1]
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                assert hashlib.sha256(data).hexdigest() == oid
                (server.root / oid).write_bytes(data)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802
                path = server.root / self.path.rsplit("/", 1)[-1]
                if not path.exists():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                if server.corrupt:
                    data = bytes([data[0] ^ 1]) + data[1:]
                server.downloads += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/lfs"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def lfs_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfs")
    server = LfsServer(root / "objects")
    env = _env(root)
    work, bare, ref = root / "work", root / "bare.git", root / "reference"
    work.mkdir()
    run = lambda *a, cwd=work: _run(list(a), cwd, env)  # noqa: E731
    run("git", "lfs", "install", "--skip-repo")
    run("git", "init", "-q", "-b", "main")
    run("git", "init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    (work / ".lfsconfig").write_text(f"[lfs]\n\turl = {server.url}\n\tlocksverify = false\n")
    run("git", "lfs", "track", "*.pt", "models/**")
    (work / "model.pt").write_bytes(os.urandom(5000))
    (work / "models").mkdir()
    (work / "models" / "big.bin").write_bytes(os.urandom(300_000))
    (work / "notes.pt.txt").write_text("not lfs\n")
    (work / "fake.pt").write_text("")   # empty: git-lfs leaves it as an empty file
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "lfs")
    run("git", "push", "-q", str(bare), "main")
    run("git", "clone", "-q", str(bare), str(ref), cwd=root)
    assert (ref / "model.pt").stat().st_size == 5000
    yield bare, ref, server
    server.stop()


def dda(*args, cache, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    env["DDA_CACHE_DIR"] = str(cache)
    env.update(extra or {})
    return subprocess.run([DDA, *args], capture_output=True, env=env, timeout=120)


def test_lfs_files_look_like_a_clone_with_git_lfs(lfs_repo, tmp_path):
    bare, ref, server = lfs_repo
    got = tmp_path / "got"
    proc = dda("get", str(bare), ".", "-o", str(got), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    assert reference_listing(got) == reference_listing(ref)
    for path, item in reference_listing(ref).items():
        if item["type"] == "file":
            assert (got / path).read_bytes() == (ref / path).read_bytes(), path
    listing = dda("ls", str(bare), cache=tmp_path / "cache").stdout.decode()
    assert "5000  model.pt" in listing
    # cached like any object: reading again downloads nothing
    before = server.downloads
    again = dda("cat", str(bare), "model.pt", cache=tmp_path / "cache")
    assert again.stdout == (ref / "model.pt").read_bytes() and server.downloads == before


def test_lfs_object_that_does_not_match_its_sha256_is_never_served(lfs_repo, tmp_path):
    bare, _, server = lfs_repo
    server.corrupt = True
    try:
        proc = dda("cat", str(bare), "model.pt", cache=tmp_path / "cache")
    finally:
        server.corrupt = False
    assert proc.returncode != 0 and proc.stdout == b""
    assert b"model.pt" in proc.stderr and b"sha256" in proc.stderr
    assert not list((tmp_path / "cache").rglob("lfs/*/*/*"))
    # nothing of it in the store either (where LFS objects are kept now)
    assert not [p for p in (tmp_path / "cache").rglob("chunks/*/*") if p.is_file()]


def _chunk_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "store-v2" / "chunks").rglob("*") if p.is_file()]


def test_lfs_objects_are_kept_in_the_store_under_the_cache_budget(lfs_repo, tmp_path):
    """#13 gap: LFS objects live in the one store, under --cache-size, evicted LRU like DVC
    objects (not in a folder of their own outside the budget)."""
    bare, ref, server = lfs_repo
    cache = tmp_path / "cache"
    big_oid = hashlib.sha256((ref / "models" / "big.bin").read_bytes()).hexdigest()
    # A roomy budget: kept, as chunks of the store keyed by the sha256, read again for free.
    proc = dda("cat", str(bare), "models/big.bin", cache=cache)
    assert proc.returncode == 0 and proc.stdout == (ref / "models" / "big.bin").read_bytes()
    kept = _chunk_files(cache)
    assert kept and all(p.parent.name == big_oid[:2] and p.name.startswith(big_oid[2:]) for p in kept)
    assert not (cache / "lfs").exists()
    before = server.downloads
    assert dda("cat", str(bare), "models/big.bin", cache=cache).stdout == (ref / "models" / "big.bin").read_bytes()
    assert server.downloads == before
    # A budget smaller than the object: served whole and right, never more on disk than the budget.
    small = tmp_path / "small"
    env_budget = {"DDA_CACHE_SIZE": "192K", "DDA_CHUNK_SIZE": "128K"}
    for _ in range(2):
        proc = dda("cat", str(bare), "models/big.bin", cache=small, extra=env_budget)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == (ref / "models" / "big.bin").read_bytes()
        assert sum(p.stat().st_blocks * 512 for p in _chunk_files(small)) <= 192 * 1024
    assert server.downloads == before + 2    # not all of it fit: fetched again
    # Another object read later evicts the LRU chunks of the first one.
    proc = dda("cat", str(bare), "model.pt", cache=small, extra=env_budget)
    assert proc.returncode == 0 and proc.stdout == (ref / "model.pt").read_bytes()
    assert sum(p.stat().st_blocks * 512 for p in _chunk_files(small)) <= 192 * 1024
