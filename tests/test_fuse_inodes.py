"""Issue 11 item 3: the FUSE inode table is O(directories), not O(files), and stays right
across a refresh (a folder whose listing changed gets fresh inodes, its old ones still name
their paths until the kernel forgets them; open files keep theirs).

The unit tests drive `InodeTable` over real compact Trees; the mount test walks a 100k-file
DVC layout through a real FUSE mount (tests/dvclayout.py, the in-memory fake remote) and
measures what the daemon allocated for it."""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tracemalloc
import uuid

import pytest

from sidecar.fs.filesystem import Refreshed
from sidecar.fuse.inodes import ROOT_INODE, InodeTable
from sidecar.snapshot.tree import Entry, Tree

REG = stat.S_IFREG | 0o644


def _file(path: str, content: str = "") -> Entry:
    return Entry(path, "dvc", REG, len(content or path), hashlib.md5((content or path).encode()).hexdigest(),
                 output="data")


def _tree(paths: dict[str, str]) -> Tree:
    return Tree({p: _file(p, c) for p, c in paths.items()})


class _Snap:
    """The table's view of 'the current snapshot' (what `engine.tree` is for the mount)."""

    def __init__(self, tree: Tree):
        self.tree = tree

    def names_of(self, folder: str):
        return self.tree.dirs.get(folder)


def test_inodes_are_numbered_per_folder_and_resolve_both_ways():
    paths = {f"data/d{d}/f{f:04d}.bin": "" for d in range(3) for f in range(2000)}
    paths["top.txt"] = ""
    snap = _Snap(_tree(paths))
    table = InodeTable(snap.names_of, "")
    assert table.inode("") == ROOT_INODE and table.path(ROOT_INODE) == ""
    seen = {}
    for path in sorted(paths) + ["data", "data/d0", "data/d1", "data/d2"]:
        inode = table.inode(path)
        assert table.path(inode) == path
        seen[inode] = path
    assert len(seen) == len(paths) + 4                      # one inode per path, none shared
    assert len(table) == 5                                  # "", data, data/d0..d2: blocks, not files
    assert table.inode("data/d1/f0007.bin") == table.inode("data/d1/f0000.bin") + 7   # block + index
    with pytest.raises(KeyError):
        table.inode("data/d1/nope")
    with pytest.raises(KeyError):
        table.path(max(seen) + 1)
    assert table.known("data/d2/f0001.bin") == table.inode("data/d2/f0001.bin")


def test_a_subdir_root_is_inode_one_and_its_children_number_below_it():
    snap = _Snap(_tree({"data/a/x": "", "data/b": "", "other/y": ""}))
    table = InodeTable(snap.names_of, "data")
    assert table.inode("data") == ROOT_INODE and table.path(ROOT_INODE) == "data"
    a = table.inode("data/a")
    assert table.path(a) == "data/a" and table.path(table.inode("data/a/x")) == "data/a/x"
    assert table.known("data/b") == a + 1


@pytest.mark.parametrize("bulk", [False, True], ids=["per-path", "bulk"])
def test_refresh_gives_a_changed_folder_fresh_inodes_and_keeps_the_rest(bulk):
    old = {"data/a/keep.bin": "k", "data/a/gone.bin": "g", "data/b/same.bin": "s", "data/b/edit.bin": "1",
           "data/c/open.bin": "1", "data/c/other.bin": "o"}
    snap = _Snap(_tree(old))
    table = InodeTable(snap.names_of, "")
    before = {p: table.inode(p) for p in list(old) + ["data", "data/a", "data/b", "data/c"]}
    for inode in before.values():
        table.looked_up(inode)                              # the kernel holds every one
    new = {"data/a/keep.bin": "k", "data/a/new.bin": "n",            # a: listing changed
           "data/b/same.bin": "s", "data/b/edit.bin": "2",           # b: same names, one file changed
           "data/c/open.bin": "2", "data/c/other.bin": "o"}          # c: the changed file is open
    old_tree, snap.tree = snap.tree, _tree(new)
    moved = Refreshed("old", "new", old_tree.files, snap.tree, old_tree)
    held = {before["data/c/open.bin"]}
    if bulk:      # what the mount passes: the two trees compared by their arrays
        from sidecar.fuse.ops import _rows_changed

        stale, retired = table.refresh(lambda path: pytest.fail(f"asked per path: {path}"), held,
                                       _rows_changed(moved))
    else:
        stale, retired = table.refresh(moved.changed, held)

    assert retired == {before["data/c/open.bin"]}
    # b kept its block: every inode is what it was; its changed file is invalidated in place
    assert table.inode("data/b/same.bin") == before["data/b/same.bin"]
    assert table.inode("data/b/edit.bin") == before["data/b/edit.bin"]
    assert (before["data/b/edit.bin"], before["data/b"], "edit.bin") in stale
    assert not any(s[0] == before["data/b/same.bin"] for s in stale)
    # a and c: fresh inodes for their children; the old ones still name the old paths
    for path in ("data/a/keep.bin", "data/c/open.bin", "data/c/other.bin"):
        assert table.inode(path) != before[path] and table.path(table.inode(path)) == path
        assert table.path(before[path]) == path
    assert table.path(before["data/a/gone.bin"]) == "data/a/gone.bin"   # resolves; the fs says ENOENT
    assert table.path(table.inode("data/a/new.bin")) == "data/a/new.bin"
    # the kernel drops every name of a's and c's old listings (so it forgets their old inodes)
    names_dropped = {(p, n) for i, p, n in stale if i == 0}
    assert {(before["data/a"], "keep.bin"), (before["data/a"], "gone.bin"), (before["data/c"], "other.bin")} \
        <= names_dropped
    # the folders themselves kept their inodes (their parent's listing did not change)
    assert table.inode("data/a") == before["data/a"] and table.inode("data") == before["data"]
    assert (ROOT_INODE, 0, "") in stale


def test_an_old_block_is_freed_once_the_kernel_forgets_it():
    snap = _Snap(_tree({"d/x": "1", "d/y": "1"}))
    table = InodeTable(snap.names_of, "")
    x, y = table.inode("d/x"), table.inode("d/y")
    table.looked_up(x, 2)                                   # one readdirplus reply of both entries
    table.looked_up(x)                                      # and a lookup
    old_tree, snap.tree = snap.tree, _tree({"d/x": "1", "d/y": "1", "d/z": "1"})
    table.refresh(Refreshed("o", "n", old_tree.files, snap.tree).changed, set())
    blocks = len(table)
    table.forget(x, 2)
    assert len(table) == blocks and table.path(y) == "d/y"  # the kernel still holds one
    table.forget(y, 1)
    assert len(table) == blocks - 1
    with pytest.raises(KeyError):
        table.path(x)
    assert table.path(table.inode("d/z")) == "d/z"
    # a block nobody looked into is freed at the refresh itself; one with an open file is not
    z = table.inode("d/z")
    old_tree, snap.tree = snap.tree, _tree({"d/x": "2"})
    stale, retired = table.refresh(Refreshed("o", "n", old_tree.files, snap.tree).changed, {z})
    assert table.path(z) == "d/z" and retired == {z}
    table.forget(z, 0, held=set())
    with pytest.raises(KeyError):
        table.path(z)


@contextlib.contextmanager
def _fake_mount(tmp_path, folders: int, per_folder: int):  # type: ignore[no-untyped-def]
    """A FUSE mount (in this process) of a DVC-identical layout of `folders` x `per_folder`
    files of 1-2 bytes on the in-memory fake remote: yields (MountThread, mountpoint)."""
    from dvclayout import write_layout
    from mounting import MountThread
    from sidecar.config import Config
    from sidecar.remotes.fake import FakeRemote

    name = f"i{uuid.uuid4().hex[:8]}"
    layout = write_layout(tmp_path / "l", folders=folders, per_folder=per_folder, remote_url=f"fake://{name}",
                          min_size=1, max_size=2)
    FakeRemote.register(name, layout.remote_root)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        config = Config(repo=str(layout.repo), cache_dir=tmp_path / "c", remotes={"default": {"url": f"fake://{name}"}})
        with MountThread(config, mp) as m:
            yield m, mp
    finally:
        FakeRemote.unregister(name)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_walking_100k_files_through_the_mount_keeps_the_inode_table_per_folder(tmp_path):
    """`os.walk` / `os.scandir` of 100,000 files in 4 folders: readdirplus gives the kernel an
    inode per entry, and the daemon's inode table must not grow with them. Before this
    change every entry cost a path string, a dict entry and a list slot (~170 B: 17 MB here);
    now a block per folder."""
    with _fake_mount(tmp_path, folders=4, per_folder=25_000) as (m, mp):
        ops = m.mount.ops
        os.listdir(mp / "data")                       # warm up: the tree and the folder blocks
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            walked = sum(len(files) for _, _, files in os.walk(mp / "data"))
            walked += sum(1 for _ in os.scandir(mp / "data/d0003"))     # a second pass
            grown = tracemalloc.get_traced_memory()[0] - before
            if os.environ.get("DDA_TRACE_TOP"):
                for stat_ in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                    print(stat_)
        finally:
            tracemalloc.stop()
        inodes = {e.inode() for e in os.scandir(mp / "data/d0003")}
        assert walked == 125_000 and len(inodes) == 25_000
        assert grown < 1_000_000, f"the walk left {grown:,} bytes allocated in the daemon"
        assert len(ops.inodes) <= 4 + 2                # "", data, d0000..d0003
        # every inode the kernel was given names its file (and stat agrees with readdir)
        sample = sorted(os.scandir(mp / "data/d0002"), key=lambda e: e.name)[::5000]
        for entry in sample:
            assert ops.inodes.path(entry.inode()) == f"data/d0002/{entry.name}"
            assert os.stat(entry.path).st_ino == entry.inode()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_after_a_refresh_every_inode_names_its_file_and_only_the_changed_folder_is_renumbered(tmp_path):
    """A refresh that adds a file to data/images/cats (a new manifest for the output): the
    kernel's inode of every listed file names that file in the daemon's table, stat and
    readdir agree, cats' files get fresh inodes (its listing changed), dogs' and labels.csv
    keep theirs, an unchanged file of cats reads its own bytes through the new inode and a
    file open across the refresh keeps reading."""
    import subprocess

    import sidecar
    from mounting import MountThread, wait_until
    from sidecar.config import Config
    from sidecar.sample import make_sample_repo

    repo, _ = make_sample_repo(tmp_path / "s", images=12, sizes=(100, 2000))
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(origin)], check=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cats, dogs = mp / "data/images/cats", mp / "data/images/dogs"

    def inodes(folder):
        return {e.name: e.inode() for e in os.scandir(folder)}

    with MountThread(Config(repo=str(origin), revision="main", cache_dir=tmp_path / "c"), mp) as m:
        table = m.mount.ops.inodes
        before_cats, before_dogs = inodes(cats), inodes(dogs)
        labels = os.stat(mp / "data/labels.csv").st_ino
        first = sorted(before_cats)[0]
        whole = (cats / first).read_bytes()
        reader = open(cats / first, "rb")
        head = reader.read(10)
        new = tmp_path / "new" / "fresh.bin"
        new.parent.mkdir()
        new.write_bytes(b"brand new")
        sidecar.upload(str(origin), [new], to="data/images/cats", revision="main", cache_dir=str(tmp_path / "up"))
        assert b'"moved": true' in os.getxattr(mp, "user.dda.refresh")
        assert wait_until(lambda: "fresh.bin" in os.listdir(cats), 10)
        after_cats, after_dogs = inodes(cats), inodes(dogs)
        assert set(after_cats) == set(before_cats) | {"fresh.bin"}
        for folder, listed in (("data/images/cats", after_cats), ("data/images/dogs", after_dogs)):
            for name, inode in listed.items():
                assert table.path(inode) == f"{folder}/{name}"
                assert os.stat(mp / folder / name).st_ino == inode
        assert after_dogs == before_dogs
        assert os.stat(mp / "data/labels.csv").st_ino == labels
        assert not set(after_cats.values()) & set(before_cats.values())
        assert (cats / first).read_bytes() == whole
        assert (cats / "fresh.bin").read_bytes() == b"brand new"
        assert head + reader.read() == whole
        reader.close()


def test_a_file_open_through_an_old_block_is_retired_when_a_later_refresh_changes_it():
    """Open across a refresh that renumbered its folder (the file itself unchanged: not
    retired, its inode in the old block), then a second refresh changes the file: its inode
    must be retired then (it keeps the open-time entry), though its block is no longer current."""
    snap = _Snap(_tree({"d/open.bin": "1", "d/x": "1"}))
    table = InodeTable(snap.names_of, "")
    opened = table.inode("d/open.bin")
    table.looked_up(opened)
    trees = [snap.tree, _tree({"d/open.bin": "1", "d/x": "1", "d/y": "1"}),
             _tree({"d/open.bin": "2", "d/x": "1", "d/y": "1"})]
    snap.tree = trees[1]
    _, retired = table.refresh(Refreshed("a", "b", trees[0].files, trees[1], trees[0]).changed, {opened})
    assert retired == set() and table.inode("d/open.bin") != opened and table.path(opened) == "d/open.bin"
    snap.tree = trees[2]
    stale, retired = table.refresh(Refreshed("b", "c", trees[1].files, trees[2], trees[1]).changed, {opened})
    assert retired == {opened} and (opened, 0, "") in stale


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_entries_of_unknown_size_go_out_without_a_node_id_and_cost_the_kernel_no_reference(tmp_path):
    """A names-only walk of a cold tree (no size known): readdirplus entries go out without a
    node id (fuse/unlinked.py), so the kernel takes no reference on them (no inode, no FORGET
    later); the name, type and d_ino still reach getdents, and a stat looks the entry up and
    finds the same inode number. Folders and sized files keep theirs."""
    from sidecar.fuse import unlinked

    assert unlinked.AVAILABLE, "pyfuse3's EntryAttributes layout changed: entries keep their node id"
    with _fake_mount(tmp_path, folders=2, per_folder=3000) as (m, mp):
        table = m.mount.ops.inodes

        def refs(folder: str) -> int:
            return table.children(folder).refs

        walked = {e.name: e for e in os.scandir(mp / "data/d0001")}
        assert len(walked) == 3000 and all(e.is_file(follow_symlinks=False) for e in walked.values())
        assert refs("data/d0001") == 0
        assert sum(1 for _, _, files in os.walk(mp / "data") for _ in files) == 6000
        assert refs("data/d0000") == 0 and refs("data") >= 2        # the folders went out linked
        first = sorted(walked)[0]
        st = os.stat(mp / "data/d0001" / first)                      # a lookup: one reference
        assert st.st_ino == walked[first].inode() and st.st_size >= 1
        assert refs("data/d0001") == 1
