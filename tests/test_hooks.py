"""install_hooks(): the engine inside Python, for notebooks and scripts that cannot mount.

Most tests use a DVC 3 sample repository (local git + local remote, no `dvc pull`: the data is
not on disk) with files that real libraries read; one test streams the DVC-authored fixture
repositories over the HTTP remote and compares with their `dvc pull` checkout.
"""
from __future__ import annotations

import builtins
import bz2
import errno
import glob
import hashlib
import io
import json
import linecache
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
import time
import tokenize
import types
from pathlib import Path

import pytest

import sidecar.hooks as hooks
from hooks_worker import RepoFiles, add_tracked_dir, archive_files, expected_dvc_files, make_hooks_repo
from sidecar.hooks import install_hooks, uninstall_hooks

ORIGINALS = {
    (builtins, "open"): builtins.open, (io, "open"): io.open, (os, "stat"): os.stat, (os, "lstat"): os.lstat,
    (os, "access"): os.access, (os, "listdir"): os.listdir, (os, "scandir"): os.scandir, (os, "mkdir"): os.mkdir,
    (os, "listxattr"): os.listxattr, (os, "chdir"): os.chdir,
    # references the standard library binds at import (issue 15.2): imported above, before the hooks
    (tarfile, "bltn_open"): builtins.open, (bz2, "_builtin_open"): builtins.open,
    (tokenize, "_builtin_open"): builtins.open,
}
if hasattr(glob, "_StringGlobber"):   # Python 3.13+
    ORIGINALS[(glob._StringGlobber, "scandir")] = vars(glob._StringGlobber)["scandir"]
    ORIGINALS[(glob._StringGlobber, "lstat")] = vars(glob._StringGlobber)["lstat"]


def _current(owner, name):
    return vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)


def assert_restored():
    for (owner, name), original in ORIGINALS.items():
        assert _current(owner, name) is original, f"{owner.__name__}.{name} not restored"
    assert hooks.ENV_VAR not in os.environ


@pytest.fixture(autouse=True)
def always_uninstall(monkeypatch):
    for var in [v for v in os.environ if v.startswith("DDA_")]:
        monkeypatch.delenv(var)
    yield
    uninstall_hooks()
    assert_restored()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One repository for the tests that only read (nothing may write into it)."""
    work = tmp_path_factory.mktemp("hooks-shared")
    repo, remote, expected = make_hooks_repo(work / "s")
    return repo, remote, expected, work / "cache"


@pytest.fixture
def fresh(tmp_path):
    repo, remote, expected = make_hooks_repo(tmp_path / "s")
    return repo, remote, expected, tmp_path / "cache"


def commit_time(repo) -> int:
    return int(subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%ct"], capture_output=True, text=True,
                              check=True).stdout)


def test_reads_like_after_dvc_pull(shared, monkeypatch):
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo / "data")            # any directory of the checkout: root = its top
    assert not (repo / "data" / "lib").exists()
    info = install_hooks(cache_dir=cache)
    assert info.root == str(repo) and info.commit and len(info.commit) == 40
    mtime = commit_time(repo)
    for rel, data in expected.items():
        path = repo / rel
        assert os.path.exists(path) and os.path.isfile(path) and not os.path.isdir(path), rel
        st = os.stat(path)
        assert st.st_size == len(data) and os.path.getsize(path) == len(data), rel
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_mtime == mtime
        assert os.lstat(path).st_size == len(data)
        assert os.access(path, os.R_OK) and not os.access(path, os.W_OK)
        with open(path, "rb") as f:
            assert f.read() == data, rel
    d = os.stat(repo / "data" / "lib" / "nested")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o755 and d.st_mtime == mtime
    assert os.path.isdir("lib/nested") and os.path.exists("lib") and not os.path.isfile("lib")
    # relative paths, bytes paths, pathlib
    assert open("lib/meta.json", "rb").read() == expected["data/lib/meta.json"]
    assert os.stat(b"lib/meta.json").st_size == len(expected["data/lib/meta.json"])
    assert sorted(os.listdir(b"lib/nested")) == [b"deeper", b"empty.bin"]


def test_sizes_are_true_before_any_download(shared, monkeypatch, tmp_path):
    repo, remote, expected, _ = shared
    install_hooks(str(repo), root=tmp_path / "view", cache_dir=tmp_path / "cache")
    stats = hooks._state.runtime.engine.fetcher.stats
    fetched = stats.bytes_fetched            # the .dir manifests, fetched when the snapshot opened
    view = tmp_path / "view"
    sizes = {}
    for dirpath, _, files in os.walk(view):
        for name in files:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, view)] = os.path.getsize(full)
    for rel, data in expected.items():
        assert sizes[rel] == len(data), rel
    assert stats.bytes_fetched == fetched, "stat must not download file content"


def test_listings_merge_local_and_remote(fresh, monkeypatch):
    repo, _, expected, cache = fresh
    monkeypatch.chdir(repo)
    (repo / "data" / "lib").mkdir()
    (repo / "data" / "lib" / "local_only.txt").write_text("mine")
    (repo / "data" / "lib" / "meta.json").write_text('{"local": true}')     # shadows the repository's
    install_hooks(cache_dir=cache)
    names = os.listdir("data/lib")
    assert sorted(names) == sorted(["array.npy", "image.png", "meta.json", "nested", "notes.txt", "table.csv",
                                    "local_only.txt"])
    assert len(names) == len(set(names))
    with os.scandir("data/lib") as it:
        entries = {e.name: e for e in it}
    assert set(entries) == set(names)
    assert isinstance(entries["local_only.txt"], os.DirEntry) and isinstance(entries["meta.json"], os.DirEntry)
    remote = entries["table.csv"]
    assert remote.path == os.path.join("data/lib", "table.csv") and os.fspath(remote) == remote.path
    assert remote.is_file() and not remote.is_dir() and not remote.is_symlink() and remote.inode() > 0
    assert remote.stat().st_size == len(expected["data/lib/table.csv"])
    assert entries["nested"].is_dir() and not entries["nested"].is_file()
    # local files are never shadowed
    assert json.load(open("data/lib/meta.json")) == {"local": True}
    assert Path("data/lib/meta.json").read_text() == '{"local": true}'
    # writes go to local disk, also below a directory that exists only in the repository
    os.makedirs("data/lib/nested/deeper/out", exist_ok=True)
    Path("data/lib/nested/deeper/out/result.txt").write_text("written")
    assert (repo / "data/lib/nested/deeper/out/result.txt").read_text() == "written"
    with open("data/lib/nested/new.txt", "w") as f:
        f.write("new")
    assert (repo / "data/lib/nested/new.txt").read_text() == "new"
    assert sorted(os.listdir("data/lib/nested")) == ["deeper", "empty.bin", "new.txt"]
    assert sorted(os.listdir("data/lib/nested/deeper")) == ["big.bin", "out"]
    # os.walk sees the union
    walked = set()
    for dirpath, _, files in os.walk("data"):
        walked.update(os.path.relpath(os.path.join(dirpath, f), ".") for f in files)
    assert {p for p in expected if p.startswith("data/")} <= walked
    assert {"data/lib/local_only.txt", "data/lib/nested/new.txt", "data/images.dvc"} <= walked


def test_pathlib_api(shared, monkeypatch):
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    lib = Path("data/lib")
    assert lib.exists() and lib.is_dir() and not lib.is_file()
    assert (lib / "table.csv").is_file() and (lib / "table.csv").exists()
    assert (lib / "table.csv").stat().st_size == len(expected["data/lib/table.csv"])
    assert sorted(p.name for p in lib.iterdir()) == ["array.npy", "image.png", "meta.json", "nested", "notes.txt",
                                                    "table.csv"]
    assert sorted(p.as_posix() for p in lib.glob("*.csv")) == ["data/lib/table.csv"]
    assert sorted(p.as_posix() for p in Path("data").rglob("*.bin")) == ["data/lib/nested/deeper/big.bin",
                                                                         "data/lib/nested/empty.bin"]
    assert sorted(p.relative_to(repo).as_posix() for p in (repo / "data").glob("**/*.png")) == ["data/lib/image.png"]
    assert (lib / "image.png").read_bytes() == expected["data/lib/image.png"]
    assert (lib / "notes.txt").read_text(encoding="utf-8") == "línea uno\nline two\nlast line\n"
    with (lib / "notes.txt").open(encoding="utf-8", newline="") as f:
        assert f.read() == "línea uno\r\nline two\r\nlast line\r\n"
    with (lib / "meta.json").open("rb") as f:
        assert json.load(f)["é"] == "ü"
    assert not Path("data/lib/nope.txt").exists() and not Path("data/nope").is_dir()


def test_file_object_behaves_like_a_file(shared, monkeypatch):
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache, chunk_size="256K")
    data = expected["data/lib/nested/deeper/big.bin"]
    with open("data/lib/nested/deeper/big.bin", "rb") as f:
        assert f.name == "data/lib/nested/deeper/big.bin" and f.mode == "rb" and f.readable() and f.seekable()
        assert not f.writable()
        assert f.read(10) == data[:10] and f.tell() == 10
        f.seek(300_000)
        assert f.read(1_000_000) == data[300_000:1_300_000]
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:] and f.read() == b""
        f.seek(100)
        buf = bytearray(70_000)
        assert f.readinto(buf) == 70_000 and bytes(buf) == data[100:70_100]
        f.seek(0)
        assert f.read() == data
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
        with pytest.raises(OSError):
            f.write(b"x")
    raw = open("data/lib/nested/deeper/big.bin", "rb", buffering=0)
    assert raw.read(5) == data[:5] and raw.readall() == data[5:]
    raw.close()
    with pytest.raises(ValueError):
        raw.read(1)
    with open("data/lib/notes.txt", encoding="utf-8") as f:
        assert f.mode == "r" and f.readline() == "línea uno\n"
        assert list(f) == ["line two\n", "last line\n"]
    with open("data/lib/notes.txt", "rt", encoding="latin-1", errors="strict", newline="\r\n") as f:
        assert f.readline() == "lÃ\xadnea uno\r\n"
    assert open("data/lib/nested/empty.bin", "rb").read() == b""
    with pytest.raises(IsADirectoryError):
        open("data/lib/nested")


def test_missing_file_raises_the_usual_error(shared, monkeypatch, tmp_path):
    repo, _, _, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    for call in (lambda p: open(p), lambda p: open(p, "rb"), os.stat, os.lstat, os.listdir, os.scandir,
                 lambda p: Path(p).read_bytes()):
        with pytest.raises(FileNotFoundError) as err:
            call("data/lib/no-such-file.csv")
        assert err.value.errno == errno.ENOENT and err.value.filename == "data/lib/no-such-file.csv"
        assert "data/lib/no-such-file.csv" in str(err.value)
    assert not os.path.exists("data/lib/no-such-file.csv") and not os.access("data/lib/no-such-file.csv", os.F_OK)
    with pytest.raises(NotADirectoryError):
        os.listdir("data/lib/table.csv")
    with pytest.raises(FileNotFoundError):       # outside the root: untouched
        open(tmp_path / "nothing-here")


def test_engine_errors_become_eio(fresh, monkeypatch):
    repo, remote, expected, cache = fresh
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    md5 = hashlib.md5(expected["data/lib/table.csv"]).hexdigest()
    (remote / "files/md5" / md5[:2] / md5[2:]).unlink()
    with pytest.raises(OSError) as err:
        open("data/lib/table.csv", "rb").read()
    assert err.value.errno == errno.EIO and "data/lib/table.csv" in str(err.value)
    assert not isinstance(err.value, FileNotFoundError)


def test_exclusions(shared, monkeypatch):
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    with pytest.raises(TypeError, match="list of glob patterns"):
        install_hooks(cache_dir=cache, exclude="*.csv")
    assert_restored()
    with pytest.raises(TypeError, match="unknown setting"):
        install_hooks(cache_dir=cache, cache_sise="1G")
    install_hooks(cache_dir=cache, exclude=["*.csv", "data/lib/nested/**", "images"])
    assert not os.path.exists("data/lib/table.csv") and not os.path.exists("data/labels.csv")
    assert not os.path.exists("data/lib/nested/empty.bin") and not os.path.exists("data/images")
    assert os.path.isdir("data/lib/nested")           # the directory itself: not matched by nested/**
    assert os.listdir("data/lib/nested") == []
    assert "table.csv" not in os.listdir("data/lib") and "images" not in os.listdir("data")
    assert open("data/lib/meta.json", "rb").read() == expected["data/lib/meta.json"]
    with pytest.raises(FileNotFoundError):
        open("data/lib/table.csv")


def test_configuration_from_env(shared, monkeypatch, tmp_path):
    repo, _, expected, _ = shared
    monkeypatch.chdir(tmp_path)                      # not a git checkout: everything from the env
    view = tmp_path / "view"
    monkeypatch.setenv("DDA_REPO", str(repo))
    monkeypatch.setenv("DDA_REVISION", "v1")         # the sample's first commit: no data/lib yet
    monkeypatch.setenv("DDA_CACHE_DIR", str(tmp_path / "envcache"))
    monkeypatch.setenv("DDA_HOOKS_ROOT", str(view))
    monkeypatch.setenv("DDA_HOOKS_EXCLUDE", "*.dvc, README.md")
    info = install_hooks()
    assert info.root == str(view) and info.revision == info.commit
    assert (tmp_path / "envcache").is_dir()
    assert sorted(os.listdir(view)) == [".dvcignore", "data"]     # gitignore-like: "*.dvc" matches ".dvc"
    assert sorted(os.listdir(view / "data")) == [".gitignore", "images", "labels.csv"]
    assert (view / "data/labels.csv").read_bytes() == expected["data/labels.csv"]
    payload = json.loads(os.environ[hooks.ENV_VAR])
    assert payload["root"] == str(view) and payload["revision"] == info.commit
    assert payload["exclude"] == ["*.dvc", "README.md"]
    uninstall_hooks()
    assert not os.path.exists(view / "data/labels.csv")


def test_paths_outside_the_root_are_untouched(shared, monkeypatch, tmp_path):
    repo, _, _, cache = shared
    monkeypatch.chdir(repo)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    install_hooks(cache_dir=cache)
    runtime = hooks._state.runtime
    calls = []
    real_call = runtime.call
    runtime.call = lambda coro: calls.append(coro) or real_call(coro)
    assert open(outside).read() == "x" and os.stat(outside).st_size == 1 and os.listdir(tmp_path)
    assert not os.path.exists(tmp_path / "missing") and not os.path.exists("/nonexistent/data/lib")
    with pytest.raises(FileNotFoundError):
        open(tmp_path / "missing")
    assert calls == []                                # no engine call for any of them
    # the fast path is cheap: os.stat outside the root, with and without hooks
    path = str(outside)
    n = 20000

    def bench():
        t = time.perf_counter()
        for _ in range(n):
            os.stat(path)
        return (time.perf_counter() - t) / n

    hooked = min(bench() for _ in range(3))
    uninstall_hooks()
    plain = min(bench() for _ in range(3))
    print(f"\nos.stat outside root: {plain * 1e6:.2f} us plain, {hooked * 1e6:.2f} us hooked")
    assert hooked < plain + 20e-6                     # loose: other suites share these CPUs


def test_uninstall_restores_exactly(shared, monkeypatch):
    repo, _, _, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    assert builtins.open is not ORIGINALS[(builtins, "open")] and os.stat is not ORIGINALS[(os, "stat")]
    assert os.path.exists("data/lib/table.csv")
    install_hooks(cache_dir=cache)                   # again: replaces, never stacks
    uninstall_hooks()
    assert_restored()
    assert not os.path.exists("data/lib/table.csv")
    uninstall_hooks()                                # twice is harmless
    assert_restored()


def test_real_libraries(shared, monkeypatch, tmp_path):
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    Image = pytest.importorskip("PIL.Image")
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    img = Image.open("data/lib/image.png")
    assert img.size == (16, 12) and img.mode == "RGB" and img.getpixel((3, 2)) == (48, 40, 40)
    with Image.open(repo / "data/lib/image.png") as im:
        im.load()
    frame = pd.read_csv("data/lib/table.csv")
    assert list(frame.columns) == ["id", "name", "score"] and len(frame) == 200 and frame["id"].sum() == 19900
    array = np.load("data/lib/array.npy")
    assert array.dtype == np.int32 and array.shape == (1000,)
    assert array.tobytes() == expected["data/lib/array.npy"][-4000:]
    with open("data/lib/meta.json") as f:
        assert json.load(f)["classes"] == ["cat", "dog"]
    assert sorted(glob.glob("data/lib/**/*.bin", recursive=True)) == ["data/lib/nested/deeper/big.bin",
                                                                      "data/lib/nested/empty.bin"]
    assert len(glob.glob(str(repo / "data/images/*/*.jpg"))) == 12
    assert glob.glob("data/lib/*.npy") == ["data/lib/array.npy"]
    shutil.copy("data/lib/nested/deeper/big.bin", tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == expected["data/lib/nested/deeper/big.bin"]
    shutil.copy2("data/lib/table.csv", tmp_path)
    assert (tmp_path / "table.csv").read_bytes() == expected["data/lib/table.csv"]
    assert os.stat(tmp_path / "table.csv").st_mtime == commit_time(repo)
    shutil.copytree("data/lib", tmp_path / "libcopy")
    got = {p.relative_to(tmp_path / "libcopy").as_posix(): p.read_bytes()
           for p in (tmp_path / "libcopy").rglob("*") if p.is_file()}
    assert got == {k.removeprefix("data/lib/"): v for k, v in expected.items() if k.startswith("data/lib/")}


@pytest.fixture
def autoload():
    """The .pth line the package ships (see README), written for this test only."""
    site_dir = sysconfig.get_paths()["purelib"]
    existed = os.path.exists(os.path.join(site_dir, hooks.PTH_NAME))
    path = hooks.install_autoload(site_dir)
    yield path
    if not existed:
        hooks.remove_autoload(site_dir)


@pytest.mark.parametrize("start", ["fork", "spawn", "forkserver"])
def test_torch_dataloader_workers(shared, monkeypatch, autoload, start):
    torch = pytest.importorskip("torch")
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    paths = sorted(str(repo / p) for p in expected)
    loader = torch.utils.data.DataLoader(RepoFiles(paths), batch_size=None, num_workers=2,
                                         multiprocessing_context=start)
    seen, pids = {}, set()
    for path, size, digest, installed, pid in loader:
        assert installed, f"hooks missing in a {start} worker"
        seen[path] = (int(size), digest)
        pids.add(int(pid))
    assert len(pids) == 2 and os.getpid() not in pids
    assert seen == {str(repo / rel): (len(data), hashlib.md5(data).hexdigest()) for rel, data in expected.items()}


def _read_item(args):
    paths, index = args
    return RepoFiles(paths)[index]


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_multiprocessing_pool_workers(shared, monkeypatch, autoload, start):
    """The same without torch (runs on every Python version)."""
    import multiprocessing

    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache)
    paths = sorted(str(repo / p) for p in expected)
    with multiprocessing.get_context(start).Pool(2) as pool:
        items = pool.map(_read_item, [(paths, i) for i in range(len(paths))])
    assert all(installed for _, _, _, installed, _ in items)
    assert {pid for *_, pid in items} - {os.getpid()}
    assert {p: (n, d) for p, n, d, _, _ in items} == {
        str(repo / rel): (len(data), hashlib.md5(data).hexdigest()) for rel, data in expected.items()}


def test_spawned_interpreter_reinstalls_from_env(shared, monkeypatch, autoload):
    repo, _, expected, cache = shared
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache, exclude=["*.npy"])
    code = ("import os, sys, builtins; from sidecar import hooks; "
            "print(hooks.hooks_installed() is not None, builtins.open is hooks._open, "
            "os.path.getsize('data/lib/table.csv'), os.path.exists('data/lib/array.npy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", str(len(expected["data/lib/table.csv"])), "False"], out.stderr
    uninstall_hooks()
    code = ("import os, builtins; from sidecar import hooks; "
            "print(hooks.hooks_installed() is not None, builtins.open is hooks._open, os.path.exists('data/lib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_fixture_repositories_over_http(any_repo, tmp_path, http_remote, s3_remote):
    """The DVC-authored repositories, their HTTP remote, compared with `dvc pull`'s checkout."""
    from test_remotes_acceptance import creds, expected_for

    expected = expected_for(any_repo, "http")
    view = tmp_path / "view"
    install_hooks(any_repo.git_url, revision=any_repo.branches["http"], root=view, cache_dir=tmp_path / "cache",
                  remotes=creds(http_remote, s3_remote))
    seen = {}
    for dirpath, dirnames, files in os.walk(view):
        for name in files:
            full = Path(dirpath) / name
            seen[full.relative_to(view).as_posix()] = full
    assert sorted(seen) == sorted(expected)
    for rel, full in seen.items():
        assert full.stat().st_size == len(expected[rel]), rel
        assert full.read_bytes() == expected[rel], rel
    assert (view / "data/images/日本語.bin").is_file()
    assert sorted(os.listdir(view / "data/images/dogs/with space")) == ["dog one.bin"]


@pytest.fixture
def fake_remote(tmp_path):
    """The hooks sample repository with its DVC remote served by the in-memory fake."""
    import uuid

    from sidecar.remotes.fake import FakeRemote

    repo, remote, expected = make_hooks_repo(tmp_path / "s")
    name = f"h{uuid.uuid4().hex[:8]}"
    fake = FakeRemote.register(name, remote)
    yield repo, fake, expected, {"default": {"url": f"fake://{name}"}}
    FakeRemote.unregister(name)


def test_listing_needs_no_sizes_and_scandir_stat_sizes_one_entry(fake_remote, tmp_path):
    """Issue 11: names and types come from the snapshot; a size is fetched for the one entry
    whose DirEntry.stat() asks (before: every file of the folder was sized first)."""
    repo, fake, expected, remotes = fake_remote
    view = tmp_path / "view"
    install_hooks(str(repo), root=view, cache_dir=tmp_path / "cache", remotes=remotes)
    fake.calls.clear()
    names = sorted(os.listdir(view / "data/images/cats"))
    walked = [(d, sorted(f)) for d, _, f in os.walk(view / "data")]
    entries = {e.name: e for e in os.scandir(view / "data/images/cats")}
    assert sorted(entries) == names and all(e.is_file() and not e.is_dir() for e in entries.values())
    assert len(walked) > 3 and fake.calls == []                  # no request for any of it
    first = entries[names[0]]
    rel = f"data/images/cats/{names[0]}"
    assert first.stat().st_size == len(expected[rel])
    assert [(c.op, c.path) for c in fake.calls if c.op in ("size", "list")] == [("size", fake.calls[0].path)]
    assert os.path.getsize(view / rel) == len(expected[rel]) and len(fake.calls) == 1   # remembered


def test_deadline_is_etimedout_in_the_hooks(fake_remote, tmp_path):
    repo, fake, expected, remotes = fake_remote
    view = tmp_path / "view"
    install_hooks(str(repo), root=view, cache_dir=tmp_path / "cache", remotes=remotes, deadline=1, retries=0)
    size = os.path.getsize(view / "data/lib/table.csv")          # sizing is not hung
    fake.script(op="read", pattern="files/md5/*", hang=True)
    with pytest.raises(OSError) as err:
        open(view / "data/lib/table.csv", "rb").read()
    assert err.value.errno == errno.ETIMEDOUT and "data/lib/table.csv" in str(err.value)
    runtime = hooks._state.runtime
    runtime.loop.call_soon_threadsafe(fake.heal)
    assert len(open(view / "data/lib/table.csv", "rb").read()) == size


def test_credentials_never_reach_the_environment(fresh, monkeypatch, autoload, tmp_path):
    """Issue 14: install_hooks() used to put remote and git credentials in plain text into
    DDA_HOOKS, inherited by every child. Children get them from a private 0600 file."""
    repo, _, expected, cache = fresh
    planted_pw, planted_token = "PLANTED-remote-" + os.urandom(6).hex(), "PLANTED-git-" + os.urandom(6).hex()
    monkeypatch.chdir(repo)
    install_hooks(cache_dir=cache, remotes={"storage": {"password": planted_pw}}, git_token=planted_token)
    environ = json.dumps(dict(os.environ))
    assert planted_pw not in environ and planted_token not in environ
    payload = json.loads(os.environ[hooks.ENV_VAR])
    secret_file = Path(payload["credentials"])
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    code = ("import os, json, sys; from sidecar import hooks; c = hooks._state.config; "
            "print(json.dumps({'env': dict(os.environ), 'argv': open('/proc/self/cmdline', 'rb').read().decode(), "
            "'pw': c.remotes['storage']['password'], 'token': c.git_token, "
            "'size': os.path.getsize('data/lib/table.csv')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    assert planted_pw not in json.dumps(child["env"]) + child["argv"]
    assert planted_token not in json.dumps(child["env"]) + child["argv"]
    assert child["pw"] == planted_pw and child["token"] == planted_token        # yet the child has them
    assert child["size"] == len(expected["data/lib/table.csv"])
    uninstall_hooks()
    assert not secret_file.exists() and not secret_file.parent.exists()


def test_git_symlinks_follow_inside_the_repository(fresh, tmp_path):
    repo, _, expected, cache = fresh
    os.symlink("lib", repo / "data" / "lib-link")
    os.symlink("lib/meta.json", repo / "data" / "meta-link.json")
    os.symlink("../../outside", repo / "data" / "escape")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "links"],
                   check=True)
    view = tmp_path / "view"
    install_hooks(str(repo), root=view, cache_dir=cache)
    assert stat.S_ISDIR(os.stat(view / "data/lib-link").st_mode)
    assert stat.S_ISLNK(os.lstat(view / "data/lib-link").st_mode) and os.lstat(view / "data/lib-link").st_size == 3
    assert sorted(os.listdir(view / "data/lib-link")) == sorted(os.listdir(view / "data/lib"))
    assert os.stat(view / "data/meta-link.json").st_size == len(expected["data/lib/meta.json"])
    assert open(view / "data/meta-link.json", "rb").read() == expected["data/lib/meta.json"]
    assert not os.path.exists(view / "data/escape") and os.path.lexists(view / "data/escape")


def test_chdir_into_a_directory_only_in_the_repository(fresh, monkeypatch, autoload):
    """Issue 15.1: in a clone without data, os.chdir() into a folder that exists only in the
    repository, then relative paths: everything agrees with a checkout (where the folder is real)."""
    repo, _, expected, cache = fresh
    monkeypatch.chdir(repo)
    assert not (repo / "data/lib").exists()
    install_hooks(cache_dir=cache)
    os.chdir("data/lib")
    here = repo / "data/lib"
    assert os.getcwd() == str(here) and os.getcwdb() == os.fsencode(here) and Path.cwd() == here
    assert os.path.abspath("image.png") == str(here / "image.png") and os.path.realpath("image.png") == str(
        here / "image.png")
    assert Path("image.png").resolve() == here / "image.png" and Path("image.png").absolute() == here / "image.png"
    with open("image.png", "rb") as f:
        assert f.name == "image.png" and f.read() == expected["data/lib/image.png"]
    assert Path("table.csv").read_bytes() == expected["data/lib/table.csv"]
    assert os.path.getsize("nested/deeper/big.bin") == len(expected["data/lib/nested/deeper/big.bin"])
    names = ["array.npy", "image.png", "meta.json", "nested", "notes.txt", "table.csv"]
    assert sorted(os.listdir()) == names and sorted(os.listdir(".")) == names
    assert sorted(e.name for e in os.scandir()) == names and sorted(p.name for p in Path().iterdir()) == names
    assert glob.glob("*.csv") == ["table.csv"] and sorted(glob.glob("**/*.bin", recursive=True)) == [
        "nested/deeper/big.bin", "nested/empty.bin"]
    assert sorted(p.as_posix() for p in Path(".").rglob("*.bin")) == ["nested/deeper/big.bin", "nested/empty.bin"]
    walked = sorted(os.path.join(d, f) for d, _, files in os.walk(".") for f in files)
    assert walked == sorted("./" + k.removeprefix("data/lib/") for k in expected if k.startswith("data/lib/"))
    # further down and back up, relatively
    os.chdir("nested/deeper")
    assert Path.cwd() == here / "nested/deeper" and open("big.bin", "rb").read(4) == \
        expected["data/lib/nested/deeper/big.bin"][:4]
    os.chdir("../..")
    assert os.getcwd() == str(here)
    # a child process starts in the same directory and reads relatively (hooks via DDA_HOOKS)
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getcwd(), os.path.getsize('table.csv'))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(here), str(len(expected["data/lib/table.csv"]))]
    # the usual errors
    with pytest.raises(NotADirectoryError):
        os.chdir("table.csv")
    with pytest.raises(FileNotFoundError):
        os.chdir("no-such-dir")
    assert os.getcwd() == str(here)
    # a directory that exists nowhere outside the root is untouched
    with pytest.raises(FileNotFoundError):
        os.chdir(repo.parent / "no-such-dir")
    uninstall_hooks()
    # the cwd stays a real directory; on disk: only the directories entered, no file
    assert os.getcwd() == str(here) and os.listdir() == ["nested"] and os.listdir("nested") == ["deeper"]
    assert os.listdir("nested/deeper") == []


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """The hooks repository plus `data/arch/` (tar, bzip2, Python source), not pulled."""
    work = tmp_path_factory.mktemp("hooks-arch")
    repo, remote, _ = make_hooks_repo(work / "s")
    add_tracked_dir(repo, remote, "arch", archive_files(), "Add archives")
    return repo, expected_dvc_files(repo, remote), work / "cache"


def _user_module():
    """A module that bound the functions the way user code does, before install_hooks()."""
    module = types.ModuleType("dda_test_early_binder")
    exec("from os import stat, listdir, scandir, lstat\nfrom builtins import open as my_open\n"
         "from io import open as io_open\n", vars(module))
    return module


BINDINGS = {
    # name: (reference bound before the hooks, a call that needs it on a repository file)
    "tarfile.bltn_open": (lambda: tarfile.bltn_open, lambda p, exp: (
        sorted(tarfile.open(p / "bundle.tar").getnames()) == ["a.txt", "sub/b.bin"] and
        tarfile.open(p / "bundle.tar").extractfile("sub/b.bin").read() == bytes(range(256)) * 40)),
    "bz2._builtin_open": (lambda: bz2._builtin_open, lambda p, exp: (
        bz2.open(p / "notes.txt.bz2").read() == "línea\n".encode() * 500)),
    "tokenize._builtin_open": (lambda: tokenize._builtin_open, lambda p, exp: (
        tokenize.open(p / "script.py").read() == exp["data/arch/script.py"].decode())),
    "linecache (tokenize.open)": (lambda: tokenize._builtin_open, lambda p, exp: (
        linecache.getline(str(p / "script.py"), 2) == "GREETING = 'héllo'\n")),
    "from os import stat/listdir/scandir/lstat": (lambda: sys.modules["dda_test_early_binder"].stat, lambda p, exp: (
        sys.modules["dda_test_early_binder"].stat(p / "bundle.tar").st_size == len(exp["data/arch/bundle.tar"]) and
        sys.modules["dda_test_early_binder"].lstat(p / "bundle.tar").st_size == len(exp["data/arch/bundle.tar"]) and
        sorted(sys.modules["dda_test_early_binder"].listdir(p)) == ["bundle.tar", "notes.txt.bz2", "script.py"] and
        sorted(e.name for e in sys.modules["dda_test_early_binder"].scandir(p)) == sorted(os.listdir(p)))),
    "from builtins/io import open": (lambda: sys.modules["dda_test_early_binder"].my_open, lambda p, exp: (
        sys.modules["dda_test_early_binder"].my_open(p / "script.py", "rb").read() == exp["data/arch/script.py"] and
        sys.modules["dda_test_early_binder"].io_open(p / "script.py", "rb").read() == exp["data/arch/script.py"])),
    "numpy DataSource (np.loadtxt)": (lambda: _numpy().lib._datasource._file_openers._file_openers[None],
                                      lambda p, exp: _numpy().loadtxt(p.parent / "lib/table.csv", delimiter=",",
                                                                      skiprows=1, usecols=(0,)).sum() == 19900),
}


def _numpy():
    return pytest.importorskip("numpy")


@pytest.mark.parametrize("binding", sorted(BINDINGS))
def test_references_bound_before_the_hooks(archives, binding, monkeypatch):
    """Issue 15.2: modules that took their own reference to open/os functions at import time
    (before install_hooks(), as tarfile, bz2 and tokenize do) read repository files too, and get
    their original back at uninstall."""
    repo, expected, cache = archives
    monkeypatch.chdir(repo)
    monkeypatch.setitem(sys.modules, "dda_test_early_binder", _user_module())
    linecache.clearcache()
    reference, works = BINDINGS[binding]
    before = reference()
    assert before in (builtins.open, os.stat)                    # bound to the original at import
    arch = repo / "data/arch"
    assert not arch.exists()
    install_hooks(cache_dir=cache)
    assert reference() is not before
    assert works(arch, expected), binding
    uninstall_hooks()
    assert reference() is before
    linecache.clearcache()


def test_chdir_follows_a_repository_symlink(fresh, tmp_path, monkeypatch):
    """os.chdir through a git symlink that exists only in the repository lands where a
    checkout's chdir lands: in the target directory (getcwd names the target)."""
    repo, _, expected, cache = fresh
    os.symlink("lib", repo / "data" / "lib-link")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "link"],
                   check=True)
    view = tmp_path / "view"                    # not even the root exists locally
    monkeypatch.chdir(tmp_path)
    install_hooks(str(repo), root=view, cache_dir=cache)
    os.chdir(view / "data/lib-link")
    assert os.getcwd() == str(view / "data/lib") and Path.cwd() == view / "data/lib"
    assert open("meta.json", "rb").read() == expected["data/lib/meta.json"]
    assert not os.path.islink(view / "data/lib") and os.path.islink(view / "data/lib-link")
