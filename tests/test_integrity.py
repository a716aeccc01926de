"""Issue 12: no wrong byte ever reaches a reader, whatever the remote, the cache or a crash does.

Every test runs the real `dda` (or a real mount) against a real HTTP server that answers
chosen requests wrongly (tests/faultremote.py), serving a DVC remote folder authored like
`dvc add` + `dvc push` would.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faultremote import FaultRemote
from mounting import MountThread, wait_until
from sidecar.config import Config

DDA = str(Path(sys.executable).parent / "dda")
MiB = 1 << 20


def _git(repo: Path, *args: str) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ["PATH"]}
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


def _put(storage: Path, data: bytes, is_dir: bool = False) -> str:
    md5 = hashlib.md5(data).hexdigest()
    target = storage / "files" / "md5" / md5[:2] / (md5[2:] + (".dir" if is_dir else ""))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return md5


class Repo:
    """A git repository whose default DVC remote is the fault remote: `big.bin` (size in its
    .dvc file), and `data/` (a tracked directory: its files' sizes come from the remote)."""

    def __init__(self, root: Path, files: dict[str, bytes], dir_files: dict[str, bytes], shape: str = "http"):
        # shape "s3": the same server seen as a path-style S3 endpoint (bucket/prefix folders)
        self.path, served = root / "repo", root / "storage"
        self.storage = served / "bucket" / "store" if shape == "s3" else served
        self.prefix = "bucket/store/" if shape == "s3" else ""
        self.path.mkdir(parents=True)
        self.storage.mkdir(parents=True)
        self.content = {**files, **{f"data/{k}": v for k, v in dir_files.items()}}
        self.server = FaultRemote(served).start()
        _git(self.path, "init", "-q", "-b", "main")
        (self.path / ".dvc").mkdir()
        remote = f"    url = {self.server.url}\n" if shape == "http" else \
            f"    url = s3://bucket/store\n    endpointurl = {self.server.url}\n"
        (self.path / ".dvc" / "config").write_text(f"[core]\n    remote = faulty\n['remote \"faulty\"']\n{remote}")
        for name, data in files.items():
            md5 = _put(self.storage, data)
            (self.path / f"{name}.dvc").write_text(yaml.safe_dump(
                {"outs": [{"md5": md5, "size": len(data), "hash": "md5", "path": name}]}))
        if dir_files:
            manifest = sorted(({"md5": _put(self.storage, d), "relpath": n} for n, d in dir_files.items()),
                              key=lambda e: e["relpath"])
            dir_md5 = _put(self.storage, json.dumps(manifest, separators=(", ", ": ")).encode(), is_dir=True)
            (self.path / "data.dvc").write_text(yaml.safe_dump({"outs": [
                {"md5": f"{dir_md5}.dir", "size": sum(map(len, dir_files.values())), "nfiles": len(dir_files),
                 "hash": "md5", "path": "data"}]}))
        _git(self.path, "add", "-A")
        _git(self.path, "commit", "-q", "-m", "data")

    def oid(self, name: str) -> str:
        return hashlib.md5(self.content[name]).hexdigest()

    def object_path(self, name: str) -> str:
        oid = self.oid(name)
        return f"{self.prefix}files/md5/{oid[:2]}/{oid[2:]}"

    def dda(self, *args: str, cache: Path, env: dict | None = None, timeout: float = 120) \
            -> subprocess.CompletedProcess:
        full = {k: v for k, v in os.environ.items() if not k.startswith("DDA_REMOTE")}
        full.update({"DDA_CACHE_DIR": str(cache), "DDA_RETRIES": "3", "DDA_REMOTE_FAULTY_ACCESS_KEY_ID": "test",
                     "DDA_REMOTE_FAULTY_SECRET_ACCESS_KEY": "test-secret", **(env or {})})
        return subprocess.run([DDA, args[0], str(self.path), *args[1:]], capture_output=True, env=full,
                              timeout=timeout)

    def config(self, cache: Path, **kw) -> Config:
        return Config(repo=str(self.path), cache_dir=cache, **{"retries": 3, **kw})


def _made(tmp_path: Path, shape: str) -> Repo:
    rng = random.Random(12)
    return Repo(tmp_path, {"big.bin": rng.randbytes(30 * 1000 * 1000), "small.bin": rng.randbytes(160687)},
                {"a.bin": rng.randbytes(160687), "mid.bin": rng.randbytes(3 * MiB + 5)}, shape)


@pytest.fixture()
def repo(tmp_path):
    made = _made(tmp_path, "http")
    yield made
    made.server.stop()


@pytest.fixture(params=["http", "s3"])
def any_repo(tmp_path, request):
    """The same checks against the HTTP and the S3 shape of the fault remote."""
    made = _made(tmp_path, request.param)
    yield made
    made.server.stop()


def store_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "store-v2" / "chunks").rglob("*") if p.is_file())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("dda: error: "), err
    return lines[0]


# -- failing today 1: large objects ---------------------------------------------------------------
@pytest.mark.parametrize("budget", ["10M", "1G"])
def test_large_object_served_wrong_fails_and_leaves_nothing(any_repo, tmp_path, budget):
    """Same-length wrong bytes for every ranged GET of a 30 MB object: `dda cat` must fail
    (never exit 0 with the wrong md5), whatever the cache budget, and keep nothing."""
    repo = any_repo
    path = repo.object_path("big.bin")
    repo.server.fault("wrong", path=path, times=None)
    cache = tmp_path / "cache"
    proc = repo.dda("cat", "big.bin", "--cache-size", budget, cache=cache)
    assert proc.returncode != 0
    assert "does not match its md5" in one_line_error(proc)
    assert hashlib.md5(proc.stdout).hexdigest() != repo.oid("big.bin")
    assert not [p for p in store_files(cache) if repo.oid("big.bin")[2:] in p.name]
    # the fault gone, the same cache serves the right bytes
    repo.server.clear()
    proc = repo.dda("cat", "big.bin", "--cache-size", budget, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.md5(proc.stdout).hexdigest() == repo.oid("big.bin")


def test_one_wrong_chunk_late_in_the_object_fails_the_last_read(repo, tmp_path):
    """Only the bytes past 20 MB are wrong: the first reads stream (unverified, by design of
    `verify: stream`), the last one fails."""
    repo.server.fault("wrong", path=repo.object_path("big.bin"), times=None, from_offset=20 * MiB)
    proc = repo.dda("cat", "big.bin", "--cache-size", "10M", cache=tmp_path / "cache")
    assert "does not match its md5" in one_line_error(proc)


def test_before_read_mode_returns_no_byte_of_a_wrong_object(repo, tmp_path):
    repo.server.fault("wrong", path=repo.object_path("big.bin"), times=None, from_offset=20 * MiB)
    proc = repo.dda("cat", "big.bin", "--cache-size", "10M", "--verify", "before-read", cache=tmp_path / "cache")
    assert "does not match its md5" in one_line_error(proc)
    assert proc.stdout == b""


def test_before_read_mode_with_a_budget_smaller_than_the_object(repo, tmp_path):
    proc = repo.dda("cat", "big.bin", "--cache-size", "10M", "--verify", "before-read", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert hashlib.md5(proc.stdout).hexdigest() == repo.oid("big.bin")


def test_partial_read_during_a_fault_is_never_cached(repo, tmp_path, mp):
    """A 4 KiB read at offset 9 MiB while the remote answers wrongly, then a fresh mount after
    the fault is gone: it must serve the right bytes (the wrong chunk was never kept)."""
    cache = tmp_path / "cache"
    want = repo.content["big.bin"][9 * MiB:9 * MiB + 4096]
    repo.server.fault("wrong", path=repo.object_path("big.bin"), times=None)
    with MountThread(repo.config(cache, cache_size=10 * MiB), mp) as m:
        with open(mp / "big.bin", "rb") as f:
            f.seek(9 * MiB)
            try:
                f.read(4096)
            except OSError:
                pass
            # the reader that reads on to the end of the object gets an error, not exit 0
            with pytest.raises(OSError):
                f.seek(0)
                while f.read(MiB):
                    pass
        m.run(m.mount.engine.fetcher.drain(30))
    repo.server.clear()
    with MountThread(repo.config(cache, cache_size=10 * MiB), mp):
        with open(mp / "big.bin", "rb") as f:
            f.seek(9 * MiB)
            assert f.read(4096) == want
        assert hashlib.md5((mp / "big.bin").read_bytes()).hexdigest() == repo.oid("big.bin")


def test_page_cache_is_dropped_after_a_failed_verification(repo, tmp_path, mp):
    """keep_cache: pages read during a failed pass must not be served afterwards."""
    cache = tmp_path / "cache"
    repo.server.fault("wrong", path=repo.object_path("big.bin"), times=None)
    with MountThread(repo.config(cache, cache_size=64 * MiB), mp) as m:
        with open(mp / "big.bin", "rb") as f:
            first = f.read(MiB)          # unverified pages land in the kernel's page cache
            with pytest.raises(OSError):
                while f.read(MiB):
                    pass
        assert first != repo.content["big.bin"][:MiB]
        m.run(m.mount.engine.fetcher.drain(30))     # a prefetch's pass started during the fault ends too
        repo.server.clear()
        with open(mp / "big.bin", "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == repo.oid("big.bin")


def test_verified_object_then_evicted_chunk_is_checked_on_its_own(repo, tmp_path):
    """After a verified pass the chunk digests are kept; a chunk evicted since and served
    wrong later is refused (refetched), never returned."""
    cache = tmp_path / "cache"
    assert repo.dda("cat", "big.bin", "--cache-size", "10M", cache=cache).returncode == 0
    sums = [p for p in store_files(cache) if p.name.endswith(".sums")]
    assert len(sums) == 1
    repo.server.fault("wrong", path=repo.object_path("big.bin"), times=2)
    proc = repo.dda("cat", "big.bin", "--cache-size", "10M", cache=cache)
    assert "does not match" in one_line_error(proc)
    proc = repo.dda("cat", "big.bin", "--cache-size", "10M", cache=cache)
    assert hashlib.md5(proc.stdout).hexdigest() == repo.oid("big.bin"), proc.stderr


def test_git_blobs_are_sha1_checked(tmp_path):
    from sidecar.engine import Engine
    import asyncio

    rng = random.Random(3)
    made = Repo(tmp_path, {}, {})
    try:
        (made.path / "code.py").write_bytes(rng.randbytes(5000))
        _git(made.path, "add", "-A")
        _git(made.path, "commit", "-q", "-m", "code")

        async def go():
            engine = await Engine.open(made.config(tmp_path / "cache"))
            async with engine:
                sha = engine.tree.files["code.py"].oid
                real = engine.git.read_blob

                async def lying(s):
                    data = await real(s)
                    return bytes([data[0] ^ 1]) + data[1:] if s == sha else data
                engine.git.read_blob = lying
                from sidecar.errors import HashMismatch
                with pytest.raises(HashMismatch, match="sha1"):
                    await engine.read("code.py", 0, 100)
        asyncio.run(go())
    finally:
        made.server.stop()


def test_two_processes_verify_one_large_object_with_one_download(repo, tmp_path):
    """Pending chunks are private to a pass, so a second process waits for the first one's
    verdict and then reads the verified chunks: the object crosses the wire once."""
    from concurrent.futures import ThreadPoolExecutor

    cache = tmp_path / "cache"
    assert repo.dda("ls", cache=cache).returncode == 0
    mark = len(repo.server.requests)
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: repo.dda("cat", "big.bin", cache=cache), range(2)))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
        assert hashlib.md5(proc.stdout).hexdigest() == repo.oid("big.bin")
    asked = 0
    for r in repo.server.requests[mark:]:
        if r.path == repo.object_path("big.bin") and r.method == "GET":
            a, _, b = r.range.removeprefix("bytes=").partition("-")
            asked += int(b) + 1 - int(a)
    assert asked == len(repo.content["big.bin"])


# -- failing today 2: chunk identity ----------------------------------------------------------------
def test_chunk_copied_over_another_name_is_refused(repo, tmp_path):
    cache = tmp_path / "cache"
    assert repo.dda("cat", "small.bin", cache=cache).returncode == 0
    assert repo.dda("cat", "data/a.bin", cache=cache).returncode == 0
    small = next(p for p in store_files(cache) if p.name.startswith(repo.oid("small.bin")[2:]))
    other = next(p for p in store_files(cache) if p.name.startswith(repo.oid("data/a.bin")[2:]))
    shutil.copyfile(small, other)       # same length: only the identity can tell
    proc = repo.dda("cat", "data/a.bin", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == repo.content["data/a.bin"]
    # and it was dropped and refetched: the file under that name is right again
    assert repo.dda("cat", "data/a.bin", cache=cache).stdout == repo.content["data/a.bin"]


def test_chunk_index_swapped_within_an_object_is_refused(repo, tmp_path):
    cache = tmp_path / "cache"
    env = {"DDA_CHUNK_SIZE": "1M"}
    assert repo.dda("cat", "data/mid.bin", cache=cache, env=env).returncode == 0
    stem = repo.oid("data/mid.bin")[2:]
    c0, c1 = (next(p for p in store_files(cache) if p.name == f"{stem}.{i}") for i in (0, 1))
    shutil.copyfile(c0, c1)
    proc = repo.dda("cat", "data/mid.bin", cache=cache, env=env)
    assert proc.returncode == 0 and proc.stdout == repo.content["data/mid.bin"]


# -- failing today 3: sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("fault,params", [("lie_length", {"method": "HEAD"}),
                                          ("range_total", {}),
                                          ("truncate_nolen", {})])
def test_one_bad_size_answer_does_not_poison_the_index(any_repo, tmp_path, fault, params):
    repo = any_repo
    cache = tmp_path / "cache"
    repo.server.fault(fault, path=repo.object_path("data/a.bin"), **params)
    repo.dda("ls", "data", cache=cache)
    repo.dda("cat", "data/a.bin", cache=cache)      # may fail once, never poison
    for _ in range(2):
        proc = repo.dda("cat", "data/a.bin", cache=cache)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == repo.content["data/a.bin"]
    ls = repo.dda("ls", "data", "--json", cache=cache)
    sizes = {json.loads(l)["path"]: json.loads(l)["size"] for l in ls.stdout.splitlines()}
    assert sizes["data/a.bin"] == 160687


def test_lying_head_then_mount_serves_the_right_size(repo, tmp_path, mp):
    cache = tmp_path / "cache"
    repo.server.fault("lie_length", method="HEAD", path=repo.object_path("data/a.bin"))
    assert repo.dda("ls", "data", cache=cache).returncode == 0      # the lie lands in the index
    with MountThread(repo.config(cache), mp):
        try:    # the first reader saw st_size 1234: it gets the right bytes or an error
            assert (mp / "data" / "a.bin").read_bytes() == repo.content["data/a.bin"]
        except OSError:
            pass
        # its read corrected the size: the kernel was told, a new reader sees the truth
        assert wait_until(lambda: os.stat(mp / "data" / "a.bin").st_size == 160687)
        assert (mp / "data" / "a.bin").read_bytes() == repo.content["data/a.bin"]
    with MountThread(repo.config(cache), mp):
        assert os.stat(mp / "data" / "a.bin").st_size == 160687


# -- failing today 4: the index is a cache ----------------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_lost_or_damaged_index_is_rebuilt(repo, tmp_path, damage):
    cache = tmp_path / "cache"
    assert repo.dda("cat", "small.bin", cache=cache).returncode == 0
    index = cache / "store-v2" / "index.sqlite"
    for p in index.parent.glob("index.sqlite*"):
        if damage == "delete":
            p.unlink()
        elif damage == "truncate":
            os.truncate(p, min(p.stat().st_size, 100))
        else:
            p.write_bytes(random.Random(1).randbytes(8192))
    mark = len(repo.server.requests)
    for cmd in (("ls",), ("cat", "small.bin"), ("cat", "data/a.bin")):
        proc = repo.dda(*cmd, cache=cache)
        assert proc.returncode == 0, proc.stderr
        assert b"AssertionError" not in proc.stderr
    assert repo.dda("cat", "small.bin", cache=cache).stdout == repo.content["small.bin"]
    # the chunk files were kept: small.bin was not downloaded again. The proofs of the
    # node-shared cache (store/tenancy.py) lived in the lost index: at most one ranged read of
    # 64 bytes shows again that this remote holds it.
    again = [r for r in repo.server.requests[mark:] if r.path == repo.object_path("small.bin")]
    assert all(_span(r.range) <= 64 for r in again), again
    assert len(again) <= 1, again


def _span(header: str | None) -> int:
    """Bytes a Range header asks for (an open or missing range: unbounded)."""
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", header or "")
    return int(m[2]) - int(m[1]) + 1 if m else 1 << 62


# -- remote faults the retry path must absorb ---------------------------------------------------------
@pytest.mark.parametrize("fault,params", [
    ("truncate", {}), ("truncate_nolen", {}), ("bad_range", {}), ("reset", {}), ("stall", {"seconds": 3}),
    ("trickle", {"delay": 0.001}), ("status", {"status": 503}), ("status", {"status": 429, "retry_after": 1}),
    ("wrong", {}),
])
def test_single_faults_are_absorbed(any_repo, tmp_path, fault, params):
    repo = any_repo
    repo.server.fault(fault, path=repo.object_path("data/mid.bin"), **params)
    env = {"DDA_CHUNK_SIZE": "1M", "DDA_REQUEST_TIMEOUT": "2"}
    if fault == "wrong":
        # Wrong bytes of a large object are only found by its md5 at the end of the pass: a
        # streaming reader that already took them must fail (see test_large_object_served_wrong...);
        # with before-read the pass is simply run again.
        env["DDA_VERIFY"] = "before-read"
    proc = repo.dda("cat", "data/mid.bin", cache=tmp_path / "cache", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == repo.content["data/mid.bin"]


def test_retry_after_is_honoured(repo, tmp_path):
    repo.server.fault("status", path=repo.object_path("small.bin"), status=429, retry_after=2)
    proc = repo.dda("cat", "small.bin", cache=tmp_path / "cache")
    assert proc.returncode == 0
    times = [r.at for r in repo.server.requests if r.path == repo.object_path("small.bin")]
    assert len(times) == 2 and times[1] - times[0] >= 1.9


# -- failing today 5, 6: one budget for the directory, a full disk ----------------------------------
def disk_usage(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Sampler:
    """The store's bytes on disk, sampled every few milliseconds on a thread."""

    def __init__(self, folder: Path):
        import threading

        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.folder.exists():
                self.peak = max(self.peak, disk_usage(self.folder))
            self._stop.wait(0.005)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_processes_sharing_a_cache_keep_the_smallest_budget(repo, tmp_path, mp):
    """Two mounts (20M, 40M) and a `dda cat` (30M) on one cache directory: while they all
    live, the directory stays under 20M (a process that ends takes its budget with it)."""
    cache = tmp_path / "cache"
    mp2 = tmp_path / "mnt2"
    mp2.mkdir()
    full = {k: v for k, v in os.environ.items() if not k.startswith("DDA_REMOTE")}
    full.update({"DDA_CACHE_DIR": str(cache), "DDA_CHUNK_SIZE": "1M"})
    # pyfuse3 serves one mount per process: the second mount is a daemon
    daemon = subprocess.run([DDA, "mount", str(repo.path), str(mp2), "--daemon", "--cache-size", "40M"],
                            env=full, capture_output=True, timeout=60)
    assert daemon.returncode == 0, daemon.stderr
    try:
        with MountThread(repo.config(cache, cache_size=20 * MiB, chunk_size=MiB), mp), \
                Sampler(cache / "store-v2") as sampler:
            cat = subprocess.Popen([DDA, "cat", str(repo.path), "big.bin", "--cache-size", "30M"], env=full,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert hashlib.md5((mp2 / "big.bin").read_bytes()).hexdigest() == repo.oid("big.bin")
            assert (mp / "data" / "mid.bin").read_bytes() == repo.content["data/mid.bin"]
            assert (mp / "small.bin").read_bytes() == repo.content["small.bin"]
            out, err = cat.communicate(timeout=120)
            assert cat.returncode == 0 and hashlib.md5(out).hexdigest() == repo.oid("big.bin"), err
            # 20M is the smallest budget; a 1 MiB chunk being written by each process is the slack
            assert sampler.peak <= 20 * MiB + 3 * MiB, sampler.peak
            assert disk_usage(cache / "store-v2") <= 20 * MiB
    finally:
        subprocess.run([DDA, "unmount", str(mp2)], capture_output=True, timeout=60)


def test_small_files_budget_counts_what_the_disk_holds(tmp_path):
    rng = random.Random(5)
    made = Repo(tmp_path, {}, {f"f{i:04d}.bin": rng.randbytes(1000) for i in range(600)})
    try:
        cache = tmp_path / "cache"
        with Sampler(cache / "store-v2") as sampler:
            proc = made.dda("get", "data", "-o", str(tmp_path / "out"), "--cache-size", "1M", "--no-progress",
                            cache=cache)
        assert proc.returncode == 0, proc.stderr
        assert disk_usage(cache / "store-v2") <= 1 * MiB
        assert sampler.peak <= 1 * MiB + 256 * 1024, sampler.peak
    finally:
        made.server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_ends_cleanly_and_leaves_no_temp_files(repo, tmp_path):
    cache = tmp_path / "small-disk"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        # git's clone lives in the cache too: fill most of what is left with a ballast file
        assert repo.dda("ls", cache=cache).returncode == 0
        ballast = cache / "ballast"
        free = os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize
        ballast.write_bytes(b"\0" * max(0, free - 3 * MiB))
        for name in ("big.bin", "data/mid.bin"):
            proc = repo.dda("cat", name, cache=cache, env={"DDA_CHUNK_SIZE": "1M"})
            if proc.returncode == 0:    # served without caching what did not fit
                assert proc.stdout == repo.content[name]
            else:
                line = one_line_error(proc)
                assert "no space left" in line
            assert list((cache / "store-v2" / "tmp").iterdir()) == []
        ballast.unlink()
        proc = repo.dda("cat", "data/mid.bin", cache=cache, env={"DDA_CHUNK_SIZE": "1M"})
        assert proc.returncode == 0 and proc.stdout == repo.content["data/mid.bin"]
    finally:
        subprocess.run(["umount", "-l", str(cache)])


# -- must work 6: many rounds of random faults, kills and budgets ------------------------------------
FAULTS = [("wrong", {}), ("wrong", {"from_offset": 2 * MiB}), ("truncate", {}), ("truncate_nolen", {}),
          ("bad_range", {}), ("range_total", {}), ("range_total", {"delta": -1}), ("reset", {}),
          ("status", {"status": 503}), ("status", {"status": 429, "retry_after": 0.2}),
          ("lie_length", {"method": "HEAD"}), ("trickle", {"delay": 0.001}), ("ignore_range", {})]


def test_random_faults_kills_and_budgets(tmp_path):
    import asyncio
    import signal
    import time

    from sidecar.engine import Engine
    from sidecar.errors import DDAError

    rng = random.Random(int(os.environ.get("DDA_FUZZ_SEED", "1212")))
    made = Repo(tmp_path, {"big.bin": rng.randbytes(6 * MiB + 17), "small.bin": rng.randbytes(70_000)},
                {"a.bin": rng.randbytes(160_687), "mid.bin": rng.randbytes(2 * MiB + 5),
                 "tiny.bin": rng.randbytes(10)})
    names = sorted(made.content)
    cache = tmp_path / "cache"
    env = {"DDA_CHUNK_SIZE": "1M", "DDA_REQUEST_TIMEOUT": "2", "DDA_DEADLINE": "20", "DDA_RETRIES": "2"}

    async def cache_serves_only_right_bytes() -> None:
        # Every answer of the remote is wrong now: whatever is read comes from the cache or fails.
        made.server.fault("wrong", times=None)
        made.server.fault("status", method="HEAD", times=None, status=503)
        config = made.config(cache, chunk_size=MiB, retries=0, deadline=10.0)
        async with await Engine.open(config) as engine:
            for name in names:
                try:
                    got = b"".join([piece async for piece in engine.iter_bytes(name)])
                except DDAError:
                    continue
                assert got == made.content[name], f"the cache served wrong bytes of {name}"
        made.server.clear()

    deadline = time.monotonic() + 50
    rounds = 0
    outcomes: dict[str, int] = {}
    try:
        while time.monotonic() < deadline:
            rounds += 1
            made.server.clear()
            for _ in range(rng.randint(0, 3)):
                action, params = rng.choice(FAULTS)
                target = made.object_path(rng.choice(names))
                made.server.fault(action, path=target, times=rng.choice([1, 2, 3, None]), **params)
            budget = rng.choice(["1M", "3M", "5M", "64M"])
            if rng.random() < 0.1:
                for p in (cache / "store-v2").glob("index.sqlite*"):
                    p.unlink()
            name = rng.choice(names)
            full = {k: v for k, v in os.environ.items() if not k.startswith("DDA_REMOTE")}
            full.update({"DDA_CACHE_DIR": str(cache), **env})
            mode = rng.choice(["stream", "stream", "before-read"])
            proc = subprocess.Popen([DDA, "cat", str(made.path), name, "--cache-size", budget, "--verify", mode],
                                    env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            killed = False
            if rng.random() < 0.3:
                try:
                    proc.wait(rng.uniform(0.2, 1.5))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
            out, err = proc.communicate(timeout=90)
            outcome = "killed" if killed else "ok" if proc.returncode == 0 else "failed"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if not killed:
                if proc.returncode == 0:
                    assert out == made.content[name], f"round {rounds}: exit 0 with wrong bytes of {name}"
                else:
                    assert b"Traceback" not in err, err.decode()
                    if mode == "before-read":
                        assert made.content[name].startswith(out), f"round {rounds}: wrong bytes before the md5"
            asyncio.run(cache_serves_only_right_bytes())
    finally:
        made.server.stop()
    print(f"{rounds} rounds: {outcomes}", file=sys.stderr)
    assert rounds >= 5


def test_a_remote_lying_about_the_total_never_cuts_cat_short(tmp_path):
    """Found by the breaker: every ranged answer says the object is 7 bytes longer than its
    .dvc says. `dda cat` of a multi-chunk file streamed a few whole chunks and then exited 0
    (a reader woken by the bytes of an answer that was then rejected copied an emptied buffer,
    and the empty read ended the stream). Right bytes with exit 0, or an error: never a cut."""
    rng = random.Random(7)
    made = Repo(tmp_path, {"big.bin": rng.randbytes(6 * MiB + 3)}, {})
    try:
        made.server.fault("range_total", times=None, delta=7)
        for run in range(3):
            proc = made.dda("cat", "big.bin", cache=tmp_path / f"cache{run}",
                            env={"DDA_CHUNK_SIZE": "1M", "DDA_DEADLINE": "8", "DDA_RETRIES": "1"})
            if proc.returncode == 0:
                assert proc.stdout == made.content["big.bin"], (len(proc.stdout), proc.stderr)
            else:   # the cause, not "download was cancelled"
                assert "big.bin" in one_line_error(proc) and "remote says" in one_line_error(proc), proc.stderr
    finally:
        made.server.stop()
