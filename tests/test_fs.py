"""The file-system layer (sidecar.fs) without a kernel mount, against the in-memory fake remote
(sidecar.remotes.fake) that scripts delays, failures, hangs and wrong bytes; plus the one error
mapping every frontend uses. The git side is real (a local repository written by
sidecar.sample); only the DVC remote is the fake. Real-server tests stay in the other files.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path

import pytest
import yaml

from sidecar.config import load_config
from sidecar.engine import Engine
from sidecar.errors import (DeadlineExceeded, HashMismatch, IsADirectory, NotADirectory, NotASymlink, NotFound,
                            ObjectMissing, RemoteAuthError, SymlinkLoop, describe)
from sidecar.fs import FileSystem
from sidecar.remotes.base import object_path
from sidecar.remotes.fake import FakeRemote, unavailable
from sidecar.sample import _git, make_sample_repo


@pytest.fixture
def sample(tmp_path):
    """(repo, fake remote holding the sample's objects, cache dir, remote name)."""
    repo, storage = make_sample_repo(tmp_path / "s")
    name = f"t{uuid.uuid4().hex[:8]}"
    fake = FakeRemote.register(name, storage)
    yield repo, fake, tmp_path / "cache", name
    FakeRemote.unregister(name)


def open_engine(repo: Path, cache: Path, name: str, **flags) -> "asyncio.Future[Engine]":
    config = load_config({"repo": str(repo), "revision": "main", "cache_dir": str(cache), **flags},
                         env={"DDA_REMOTE_DEFAULT_URL": f"fake://{name}"})
    return Engine.open(config)


def run(coro):
    return asyncio.run(coro)


def commit_labels(repo: Path, fake: FakeRemote, data: bytes) -> None:
    """A new commit on main where data/labels.csv has `data` (object put on the fake remote)."""
    md5 = hashlib.md5(data).hexdigest()
    fake.objects[object_path(md5, legacy=False)] = data
    (repo / "data" / "labels.csv.dvc").write_text(yaml.safe_dump(
        {"outs": [{"md5": md5, "size": len(data), "hash": "md5", "path": "labels.csv"}]}, sort_keys=False))
    _git(repo, "commit", "-q", "-am", "new labels")


def test_listdir_answers_names_and_types_without_requests(sample):
    repo, fake, cache, name = sample

    async def go():
        async with await open_engine(repo, cache, name) as engine:
            fs = FileSystem(engine)
            fake.calls.clear()
            items = fs.listdir("data/images/cats")
            assert len(items) == 24 and all(i.kind == "file" and i.size is None for i in items)
            top = {i.name: i.kind for i in fs.listdir("data")}
            assert top["images"] == "dir" and top["labels.csv"] == "file"
            assert fake.calls == []                         # no network, no sizing
            assert engine.fetcher.stats.size_lookups == 0
            # a size is learned for the one entry asked about, once
            attr = await fs.stat(items[0].path)
            assert attr.size == len(fake.objects[object_path(engine.tree.files[items[0].path].oid, False)])
            assert stat.S_ISREG(attr.mode) and attr.nlink == 1 and attr.blocks == -(-attr.size // 512)
            assert attr.mtime_ns == engine.info.commit_time * 10**9
            assert fake.count("size") == 1 and fake.count("list") == 0
            assert (await fs.stat(items[0].path)).size == attr.size and fake.count("size") == 1
            assert fs.listdir("data/images/cats")[0].size == attr.size       # now known without asking
            d = await fs.stat("data/images")
            subdirs = sum(1 for e in fs.listdir("data/images") if e.kind == "dir")
            assert subdirs == 2 and d.nlink == 2 + subdirs     # as a checkout: each subfolder's `..`
            assert stat.S_ISDIR(d.mode) and d.size == 4096
            path, looked = await fs.lookup("data/images", "cats")
            assert path == "data/images/cats" and looked.kind == "dir"

    run(go())


def test_errors_are_fields_not_text(sample):
    repo, fake, cache, name = sample

    async def go():
        async with await open_engine(repo, cache, name) as engine:
            fs = FileSystem(engine)
            cases = [(fs.stat("data/nope"), NotFound, errno.ENOENT), (fs.open("data"), IsADirectory, errno.EISDIR),
                     (fs.readlink("data/labels.csv"), NotASymlink, errno.EINVAL)]
            for coro, kind, code in cases:
                with pytest.raises(kind) as err:
                    await coro
                assert err.value.errno == code and describe(err.value).errno == code and err.value.path
            with pytest.raises(NotADirectory) as err:
                fs.listdir("data/labels.csv")
            assert err.value.errno == errno.ENOTDIR

    run(go())


def test_open_handle_is_pinned_across_refresh(sample):
    repo, fake, cache, name = sample
    old = (repo / "data" / "labels.csv").read_bytes() if (repo / "data" / "labels.csv").exists() else None
    assert old is None                                      # not pulled: only the remote has it

    async def go():
        async with await open_engine(repo, cache, name) as engine:
            fs = FileSystem(engine)
            handle = await fs.open("data/labels.csv")
            before = await fs.read(handle, 0, 10)
            new = b"other content, other length\n" * 3
            commit_labels(repo, fake, new)
            moved = await fs.refresh()
            assert moved is not None and moved.changed("data/labels.csv") and not moved.changed("README.md")
            rest = b"".join([piece async for piece in fs.iter_bytes(handle)])
            again = await fs.open("data/labels.csv")
            assert b"".join([p async for p in fs.iter_bytes(again)]) == new
            assert (await fs.stat("data/labels.csv")).size == len(new)
            assert handle.size != len(new) and rest[:10] == before
            assert rest.count(b"\n") == 48                  # the old file, whole
            fs.release(handle)
            fs.release(again)
            assert fs.open_count == 0

    run(go())


def test_deadline_is_etimedout_in_every_frontend(sample):
    """A hung remote: the fs read fails at the deadline with ETIMEDOUT, and so do the FUSE
    adapter (called directly, no kernel) and the CLI's exit code and the metric label."""
    pyfuse3 = pytest.importorskip("pyfuse3")
    from sidecar.fetch.prefetch import Prefetcher
    from sidecar.fuse.ops import DdaOperations

    repo, fake, cache, name = sample

    async def go():
        async with await open_engine(repo, cache, name, deadline="1", retries="0") as engine:
            fs = FileSystem(engine)
            handle = await fs.open("data/labels.csv")        # sized: the HEAD is not hung
            fake.script(op="read", pattern="files/md5/*", hang=True)
            with pytest.raises(DeadlineExceeded) as err:
                await fs.read(handle, 0, 100)
            info = describe(err.value)
            assert info.errno == errno.ETIMEDOUT and info.reason == "deadline" and info.exit_code == 1
            assert "data/labels.csv" in info.message and err.value.path == "data/labels.csv"
            ops = DdaOperations(engine, Prefetcher(engine), "")
            inode = ops._inode("data/labels.csv")
            fi = await ops.open(inode, os.O_RDONLY, None)
            with pytest.raises(pyfuse3.FUSEError) as fuse_err:
                await ops.read(fi.fh, 0, 100)
            assert fuse_err.value.errno == errno.ETIMEDOUT
            fake.heal()
            # The same pages right after a deadline fail at once (the kernel's immediate retry
            # must not wait a second deadline); after that window a read goes to the remote again.
            from sidecar.fuse import ops as ops_module

            await asyncio.sleep(ops_module.RETRY_AFTER_DEADLINE_WINDOW)
            assert (await ops.read(fi.fh, 0, 5)) == (await fs.read(handle, 0, 5))   # healthy again
            await ops.release(fi.fh)
            assert ops.fs.open_count == 0

    run(go())


def test_transient_failures_are_retried_and_wrong_bytes_never_served(sample):
    repo, fake, cache, name = sample

    async def go():
        async with await open_engine(repo, cache, name, retries="3") as engine:
            engine.fetcher.backoff_base = 0.01
            fs = FileSystem(engine)
            entries = [i.path for i in fs.listdir("data/images/cats")]
            good = fake.objects[object_path(engine.tree.files[entries[0]].oid, False)]
            fault = fake.script(op="read", pattern="files/md5/*", error=unavailable, times=2)
            handle = await fs.open(entries[0])
            assert await fs.read(handle, 0, handle.size) == good
            assert engine.fetcher.stats.retries == 2 and fault.times == 0
            # wrong bytes: refused (md5), counted, never served, not cached
            fake.faults.clear()
            target = entries[1]
            oid = engine.tree.files[target].oid
            right = fake.objects[object_path(oid, False)]
            fake.script(op="read", pattern=object_path(oid, False), data=b"x" * len(right))
            bad = await fs.open(target)
            with pytest.raises(HashMismatch) as err:
                await fs.read(bad, 0, bad.size)
            assert err.value.errno == errno.EIO and describe(err.value).reason == "hash_mismatch"
            fake.heal()
            assert await fs.read(bad, 0, bad.size) == right
            # a missing object and a refused credential: their own errno and reason
            del fake.objects[object_path(engine.tree.files[entries[2]].oid, False)]
            with pytest.raises(ObjectMissing) as missing:
                await fs.open(entries[2])
            assert describe(missing.value).reason == "missing" and missing.value.path == entries[2]
            fake.script(op="size", pattern="*", error=RemoteAuthError)
            with pytest.raises(RemoteAuthError) as denied:
                await fs.stat(entries[3])
            assert describe(denied.value).errno == errno.EACCES and describe(denied.value).reason == "auth"

    run(go())


def test_slow_remote_delays_only_the_reader_that_needs_it(sample):
    """A scripted 1.5 s delay on one object: another file's read does not wait behind it."""
    repo, fake, cache, name = sample

    async def go():
        async with await open_engine(repo, cache, name) as engine:
            fs = FileSystem(engine)
            a, b = [i.path for i in fs.listdir("data/images/dogs")][:2]
            slow_oid = engine.tree.files[a].oid
            fake.script(op="read", pattern=object_path(slow_oid, False), delay=1.5)
            ha, hb = await fs.open(a), await fs.open(b)
            order = []

            async def read(h, tag):
                await fs.read(h, 0, h.size)
                order.append(tag)

            await asyncio.gather(read(ha, "slow"), read(hb, "fast"))
            assert order == ["fast", "slow"]

    run(go())


def test_symlinks_resolve_inside_the_snapshot(sample):
    repo, fake, cache, name = sample
    os.symlink("labels.csv", repo / "data" / "link.csv")
    os.symlink("../../etc/passwd", repo / "data" / "escape")
    os.symlink("loop-b", repo / "data" / "loop-a")
    os.symlink("loop-a", repo / "data" / "loop-b")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "links")

    async def go():
        async with await open_engine(repo, cache, name) as engine:
            fs = FileSystem(engine)
            assert fs.kind("data/link.csv") == "symlink"
            assert await fs.readlink("data/link.csv") == "labels.csv"
            assert (await fs.stat("data/link.csv")).kind == "symlink"
            followed = await fs.stat("data/link.csv", follow=True)
            assert followed.kind == "file" and followed.size == (await fs.stat("data/labels.csv")).size
            with pytest.raises(NotFound):
                await fs.resolve("data/escape")
            with pytest.raises(SymlinkLoop) as loop:
                await fs.resolve("data/loop-a")
            assert describe(loop.value).errno == errno.ELOOP

    run(go())


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mount_lists_without_sizing_and_the_kernel_never_keeps_an_unknown_size(sample, mp):
    """Issue 11: readdir answered only after sizing every child. Now names and types come
    at once, with no request; the kernel must not cache the size it was not told (a read
    after `ls` would see an empty file)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from mounting import MountThread
    from sidecar.config import Config

    repo, fake, cache, name = sample
    config = Config(repo=str(repo), cache_dir=cache, remotes={"default": {"url": f"fake://{name}"}})
    with MountThread(config, mp) as m:
        tree = m.mount.engine.tree
        fake.calls.clear()
        cats = mp / "data/images/cats"
        names = os.listdir(cats)
        files = [(d, f) for d, _, fs in os.walk(mp) for f in fs]          # find -type f
        types = {e.name: e.is_file(follow_symlinks=False) for e in os.scandir(cats)}
        assert len(names) == 24 and all(types.values()) and len(files) == len(tree.files)
        assert fake.calls == []
        first = sorted(names)[0]
        want = fake.objects[object_path(tree.files[f"data/images/cats/{first}"].oid, False)]
        assert os.stat(cats / first).st_size == len(want)                  # asked now, not 0 from readdir
        assert [c.op for c in fake.calls] == ["size"]
        second = sorted(names)[1]
        with open(cats / second, "rb") as f:                                # open after ls: whole content
            data = f.read()
        assert data == fake.objects[object_path(tree.files[f"data/images/cats/{second}"].oid, False)]
        sizes = {e.name: e.stat().st_size for e in os.scandir(cats)}
        assert all(sizes[n] == len(fake.objects[object_path(tree.files[f"data/images/cats/{n}"].oid, False)])
                   for n in names)


def test_one_mapping_for_errno_reason_and_exit_code():
    """The errno, metric label and exit code of an error are fields of its class, the same
    for every frontend; the reasons the metrics export at 0 are the error classes' own."""
    from sidecar import metrics
    from sidecar.errors import ConfigError, RemoteUnavailable

    assert set(metrics.ERROR_REASONS) == {RemoteUnavailable.reason, DeadlineExceeded.reason,
                                          ObjectMissing.reason, HashMismatch.reason}
    assert describe(TimeoutError()).errno == errno.ETIMEDOUT and describe(TimeoutError()).reason == "deadline"
    assert describe(asyncio.CancelledError()).reason == "cancelled"
    assert describe(ConfigError("x")).exit_code == 2 and describe(NotFound("x")).exit_code == 1
    assert describe(RuntimeError("boom")).errno == errno.EIO
    custom = ObjectMissing("m", path="a/b", errno=errno.ENODATA)       # per-instance override
    assert custom.errno == errno.ENODATA and custom.path == "a/b" and ObjectMissing.errno == errno.EIO
