"""`dda mount` with real syscalls: POSIX behaviour, lifecycle, prefetch. Uses the sample
repository (local git + local DVC remote); the fixture repositories over HTTP/S3 are read
through the mount in test_remotes_acceptance.py."""
from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mounting import DDA, MountThread, daemon_pid, mounted, wait_until
from sidecar.config import Config
from sidecar.sample import make_sample_repo

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    work = tmp_path_factory.mktemp("sample")
    repo, remote = make_sample_repo(work)
    return repo, remote


def checkout(repo: Path, remote: Path) -> dict[str, bytes]:
    """What `dvc pull` would put on disk, rebuilt from the sample's own remote."""
    import json

    import yaml

    files: dict[str, bytes] = {}
    for path in subprocess.run(["git", "-C", str(repo), "ls-files"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        files[path] = (repo / path).read_bytes()
    for dvcfile in [p for p in files if p.endswith(".dvc")]:
        out = yaml.safe_load(files[dvcfile])["outs"][0]
        base = str(Path(dvcfile).parent / out["path"])
        md5 = out["md5"]
        if md5.endswith(".dir"):
            manifest = json.loads((remote / "files/md5" / md5[:2] / (md5[2:])).read_bytes())
            for item in manifest:
                files[f"{base}/{item['relpath']}"] = (remote / "files/md5" / item["md5"][:2] / item["md5"][2:]).read_bytes()
        else:
            files[base] = (remote / "files/md5" / md5[:2] / md5[2:]).read_bytes()
    return files


def test_mount_matches_checkout_and_behaves_like_posix(sample, mp, tmp_path):
    repo, remote = sample
    expected = checkout(repo, remote)
    config = Config(repo=str(repo), cache_dir=tmp_path / "cache")
    with MountThread(config, mp) as m:
        seen = {}
        for dirpath, dirnames, filenames in os.walk(mp):
            for name in filenames:
                full = Path(dirpath) / name
                seen[str(full.relative_to(mp))] = full
        assert sorted(seen) == sorted(expected)
        commit_time = m.mount.engine.info.commit_time
        for rel, full in seen.items():
            st = os.stat(full)
            assert st.st_size == len(expected[rel]), rel
            assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o644
            assert st.st_mtime == commit_time
            assert st.st_blocks == -(-st.st_size // 512)
            assert full.read_bytes() == expected[rel], rel
        # readdir reports types without a stat
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in os.scandir(mp / "data")}
        assert kinds["images"] == (True, False) and kinds["labels.csv"] == (False, True)
        # seek, partial reads, mmap
        big = max(seen, key=lambda r: len(expected[r]))
        with open(seen[big], "rb") as f:
            f.seek(1000)
            assert f.read(5000) == expected[big][1000:6000]
            f.seek(-100, os.SEEK_END)
            assert f.read() == expected[big][-100:]
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                assert mm[:] == expected[big]
        # writes fail with EROFS
        for attempt in (lambda: open(mp / "new.txt", "w"), lambda: open(seen[big], "r+b"),
                        lambda: os.mkdir(mp / "d"), lambda: os.unlink(seen[big])):
            with pytest.raises(OSError) as err:
                attempt()
            assert err.value.errno == errno.EROFS
        assert os.getxattr(mp, "user.dda.commit").decode() == m.mount.engine.info.commit
        with pytest.raises(FileNotFoundError):
            os.stat(mp / "data" / "nope")


def test_concurrent_readers_and_many_open_files(sample, mp, tmp_path):
    repo, remote = sample
    expected = checkout(repo, remote)
    config = Config(repo=str(repo), cache_dir=tmp_path / "cache", jobs=4)
    images = sorted(p for p in expected if p.startswith("data/images/"))
    with MountThread(config, mp):
        handles = [open(mp / p, "rb") for p in images]     # all open at once
        try:
            def read(i: int) -> bool:
                f = handles[i % len(handles)]
                return os.pread(f.fileno(), 1 << 20, 0) == expected[images[i % len(handles)]]
            with ThreadPoolExecutor(16) as pool:
                assert all(pool.map(read, range(len(images) * 4)))
        finally:
            for f in handles:
                f.close()


def test_walk_over_ten_thousand_entries(tmp_path, mp):
    repo, remote = make_sample_repo(tmp_path / "wide", images=10_500, sizes=(10, 40))
    with MountThread(Config(repo=str(repo), cache_dir=tmp_path / "cache"), mp):
        count = sum(len(files) for _, _, files in os.walk(mp / "data" / "images"))
        assert count == 10_500
        sizes = {e.name: e.stat().st_size for e in os.scandir(mp / "data" / "images" / "cats")}
        assert len(sizes) == 5_250 and all(10 <= s <= 40 for s in sizes.values())


def test_prefetch_hints_then_reads_need_no_requests(tmp_path, mp):
    repo, remote = make_sample_repo(tmp_path / "hinted", images=300, sizes=(1_000, 5_000))
    with MountThread(Config(repo=str(repo), cache_dir=tmp_path / "cache"), mp) as m:
        names = sorted(os.listdir(mp / "data/images/dogs"))[:100]
        paths = [f"data/images/dogs/{n}" for n in names]
        import random
        random.Random(3).shuffle(paths)

        async def hint_and_wait():
            accepted, unknown = m.mount.prefetcher.hint(paths + ["data/no/such.file"])
            await m.mount.prefetcher.wait_idle()
            return accepted, unknown

        accepted, unknown = m.run(hint_and_wait())
        assert accepted == 100 and unknown == ["data/no/such.file"]
        stats = m.mount.engine.fetcher.stats
        before = stats.requests
        for p in paths:
            assert len((mp / p).read_bytes()) > 0
        assert stats.requests == before
        assert m.mount.prefetcher.stats.used_files == 100


def test_sequential_directory_walk_prefetches_ahead(tmp_path, mp):
    repo, remote = make_sample_repo(tmp_path / "walk", images=200, sizes=(1_000, 5_000))
    with MountThread(Config(repo=str(repo), cache_dir=tmp_path / "cache"), mp) as m:
        names = sorted(os.listdir(mp / "data/images/cats"))
        for n in names[:10]:
            (mp / "data/images/cats" / n).read_bytes()
        m.run(m.mount.prefetcher.wait_idle())
        assert m.mount.prefetcher.stats.issued_files >= 8
        assert m.mount.prefetcher.stats.used_files >= 5


def _daemon(repo: Path, mp: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDA_CACHE_DIR": str(cache)}
    return subprocess.run([DDA, "mount", str(repo), str(mp), "--daemon", *extra], capture_output=True, text=True,
                          env=env, timeout=120)


def test_daemon_sigterm_unmounts_cleanly(sample, mp, tmp_path):
    repo, _ = sample
    proc = _daemon(repo, mp, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert mounted(mp)
    status = subprocess.run([DDA, "status", str(mp)], capture_output=True, text=True)
    assert status.returncode == 0 and "commit" in status.stdout
    pid = daemon_pid(mp)
    # a reader holding a file open does not keep the daemon alive
    f = open(mp / "README.md", "rb")
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15)
    assert not mounted(mp)
    try:
        f.close()   # its file system was detached under it; closing may report that
    except OSError as err:
        assert err.errno == errno.ENOTCONN


def test_unmount_command_and_fusermount(sample, mp, tmp_path):
    repo, _ = sample
    for how in ([DDA, "unmount", str(mp)], ["fusermount3", "-u", str(mp)]):
        assert _daemon(repo, mp, tmp_path / "cache").returncode == 0
        pid = daemon_pid(mp)
        subprocess.run(how, check=True)
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15)
        assert not mounted(mp)


def test_sigkill_gives_enotconn_and_next_mount_recovers(sample, mp, tmp_path):
    repo, _ = sample
    assert _daemon(repo, mp, tmp_path / "cache").returncode == 0
    pid = daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10)
    result: dict[str, object] = {}

    def reader() -> None:
        try:
            os.listdir(mp)
            result["ok"] = True
        except OSError as err:
            result["errno"] = err.errno

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reader hung on a dead mount"
    assert result.get("errno") == errno.ENOTCONN
    status = subprocess.run([DDA, "status", str(mp)], capture_output=True, text=True)
    assert status.returncode != 0 and "stale" in status.stderr
    again = _daemon(repo, mp, tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    assert (mp / "README.md").read_bytes().startswith(b"# sample")
    subprocess.run([DDA, "unmount", str(mp)], check=True)


def test_occupied_and_bad_mountpoints(sample, mp, tmp_path):
    repo, _ = sample
    assert _daemon(repo, mp, tmp_path / "cache").returncode == 0
    try:
        second = _daemon(repo, mp, tmp_path / "cache")
        assert second.returncode != 0
        assert "already a mount point" in second.stderr and "Traceback" not in second.stderr
    finally:
        subprocess.run([DDA, "unmount", str(mp)], check=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    res = _daemon(repo, full, tmp_path / "cache")
    assert res.returncode != 0 and "not empty" in res.stderr
    res = _daemon(repo, tmp_path / "missing", tmp_path / "cache")
    assert res.returncode != 0 and "does not exist" in res.stderr


def test_a_subdir_above_the_repository_or_naming_a_file_is_refused_on_one_line(sample, mp, tmp_path):
    """`--subdir ../` used to mount the repository's root (`..` clamped at the top) and a file
    was "no such directory": each is refused with one line saying which, nothing mounted."""
    repo, _ = sample
    for subdir, says in (("../", "climbs above the repository"), ("data/../..", "climbs above the repository"),
                         ("data/labels.csv", "is a file, not a directory"), ("nope", "no such directory")):
        res = _daemon(repo, mp, tmp_path / "cache", "--subdir", subdir)
        assert res.returncode != 0 and says in res.stderr and "Traceback" not in res.stderr, (subdir, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not os.path.ismount(mp)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_mount_exits_cleanly_on_signal(sample, mp, tmp_path, sig):
    repo, _ = sample
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([DDA, "mount", str(repo), str(mp)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: mounted(mp), 30), proc.stderr.read() if proc.poll() is not None else "not mounted"
        assert (mp / "README.md").read_bytes().startswith(b"# sample")
        proc.send_signal(sig)
        assert proc.wait(15) == 0
        assert not mounted(mp)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_with_reader_blocked_on_a_remote_that_never_answers(tmp_path, mp):
    """The daemon leaves within seconds; the blocked reader gets an error, not a hang."""
    from faultremote import FaultRemote

    repo, remote = make_sample_repo(tmp_path / "s", images=4)
    server = FaultRemote(Path(remote)).start()
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache"), "DDA_REMOTE_STORAGE_URL": server.url}
    # the snapshot's manifest is fetched once while the remote answers (the cache then holds
    # it, proven for this remote: store/tenancy.py); from then on the remote never answers
    subprocess.run([DDA, "ls", str(repo)], env=env, check=True, capture_output=True)
    server.fault("stall", method=None, times=None, seconds=3600)
    proc = subprocess.Popen([DDA, "mount", str(repo), str(mp), "--deadline", "300"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: mounted(mp), 30)
        victim = mp / "data/labels.csv"
        outcome: dict[str, object] = {}

        def reader() -> None:
            try:
                victim.read_bytes()
                outcome["read"] = True
            except OSError as err:
                outcome["errno"] = err.errno

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        time.sleep(1.0)
        assert t.is_alive()              # blocked on the silent remote
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 8
        t.join(10)
        assert not t.is_alive() and "errno" in outcome
        assert not mounted(mp)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()


def test_stale_mount_after_cached_reads_is_recovered(sample, mp, tmp_path):
    """`dda mount --daemon; ls -R; kill -9; dda mount` (issue 16): after the walk the kernel
    answers stat() of the dead mount from its attribute cache, so staleness is decided by the
    mount table and a statfs the kernel always forwards."""
    repo, _ = sample
    assert _daemon(repo, mp, tmp_path / "cache").returncode == 0
    pid = daemon_pid(mp)
    subprocess.run(["ls", "-lR", str(mp)], check=True, capture_output=True)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10)
    again = _daemon(repo, mp, tmp_path / "cache")
    try:
        assert again.returncode == 0, again.stderr
        assert (mp / "README.md").read_bytes().startswith(b"# sample")
        assert "recovered a stale mount" in (tmp_path / "cache" / "logs" / "mount.log").read_text()
    finally:
        subprocess.run([DDA, "unmount", str(mp)])
    assert not mounted(mp)


def test_is_stale_never_calls_a_live_mount_stale(sample, mp, tmp_path):
    from sidecar.fuse.mountpoint import is_stale

    repo, _ = sample
    assert not is_stale(mp)                    # a plain directory
    with MountThread(Config(repo=str(repo), cache_dir=tmp_path / "cache"), mp):
        os.listdir(mp)
        assert not is_stale(mp)


def test_unmount_while_a_directory_is_being_sized_ends_the_daemon(tmp_path, mp):
    """A listing whose sizes wait on a remote that never answers, and `dda unmount --lazy`
    (a busy mount; the kubelet's teardown is alike): the mount leaves the table at once, and
    the daemon must end within seconds too (it used to wait in pyfuse3.main() until the
    request's deadline, holding /dev/fuse); the lister then gets an error, not a hang."""
    from faultremote import FaultRemote

    repo, remote = make_sample_repo(tmp_path / "s", images=6)
    server = FaultRemote(Path(remote)).start()
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache"), "DDA_REMOTE_STORAGE_URL": server.url}
    # the manifest once while the remote answers (cached and proven for it), then silence
    subprocess.run([DDA, "ls", str(repo)], env=env, check=True, capture_output=True)
    server.fault("stall", method=None, times=None, seconds=3600)
    proc = subprocess.run([DDA, "mount", str(repo), str(mp), "--daemon", "--deadline", "300"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pid = daemon_pid(mp)
    lister = subprocess.Popen(["ls", "-l", str(mp / "data" / "images" / "cats")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        assert lister.poll() is None                  # waiting for the sizes
        busy = subprocess.run([DDA, "unmount", str(mp)], capture_output=True, text=True)
        assert busy.returncode != 0 and "--lazy" in busy.stderr and "Traceback" not in busy.stderr
        started = time.monotonic()
        subprocess.run([DDA, "unmount", "--lazy", str(mp)], check=True)
        assert not mounted(mp)
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15), "daemon still alive after unmount"
        assert time.monotonic() - started < 10
        assert lister.wait(10) != 0                   # an error, not a hang
    finally:
        server.stop()
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        if lister.poll() is None:
            lister.kill()
        if mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (git cat-file readers, ...)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def test_unmount_during_a_directory_prefetch_ends_the_daemon(tmp_path, mp):
    """Issue 16, must-work 4: a reader opens files of a folder one after another, so the
    directory is fetched ahead, from a remote that never answers; `dda unmount` (nothing is
    open: a plain unmount) must end the daemon within seconds, its children (git cat-file
    readers) with it. It once stayed alive over 2 minutes holding /dev/fuse, waiting in
    pyfuse3.main()."""
    from faultremote import FaultRemote

    repo, remote = make_sample_repo(tmp_path / "s", images=40)
    server = FaultRemote(Path(remote)).start()
    cats = mp / "data" / "images" / "cats"
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache"), "DDA_REMOTE_STORAGE_URL": server.url}
    # a first mount learns every size (kept in the cache), so the second lists without the remote
    subprocess.run([DDA, "mount", str(repo), str(mp), "--daemon"], env=env, check=True, capture_output=True)
    names = sorted(os.listdir(cats))
    assert len(names) >= 12 and all(os.stat(cats / n).st_size > 0 for n in names)
    subprocess.run([DDA, "unmount", str(mp)], check=True)
    assert wait_until(lambda: not mounted(mp), 10)

    server.fault("stall", method=None, times=None, seconds=3600)     # from now on it never answers
    proc = subprocess.run([DDA, "mount", str(repo), str(mp), "--daemon", "--deadline", "300"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pid = daemon_pid(mp)
    try:
        assert (mp / "README.md").read_bytes()          # a git blob: a cat-file reader starts
        mark = len(server.requests)
        for name in names[:8]:                          # in listing order: the walk is followed
            os.close(os.open(cats / name, os.O_RDONLY))
        # the prefetch reached the remote ...
        assert wait_until(lambda: any(r.method == "GET" for r in server.requests[mark:]), 20)
        time.sleep(0.5)                                 # ... and waits there
        children = _children(pid)
        assert any(b"cat-file" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children), children
        started = time.monotonic()
        done = subprocess.run([DDA, "unmount", str(mp)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert not mounted(mp)
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15), "daemon still alive after unmount"
        assert time.monotonic() - started < 10
        assert wait_until(lambda: not any(Path(f"/proc/{c}").exists() for c in children), 10), children
        assert "Traceback" not in (tmp_path / "cache" / "logs" / "mount.log").read_text()
    finally:
        server.stop()
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        if mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])
