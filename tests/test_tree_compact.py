"""Issue 11 item 3, memory: the compact tree keeps every Entry field main's tree has and the
composition rules of `compose_tree`; a `.dir` manifest is parsed in bounded memory; the
fetcher's in-memory sizes are bounded."""
from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import time
import tracemalloc

import pytest

from sidecar.errors import DvcFileError
from sidecar.snapshot.build import compose_tree
from sidecar.snapshot.dvcfiles import DvcOut, ManifestEntry, parse_manifest
from sidecar.snapshot.git import GitEntry
from sidecar.snapshot.tree import Entry, Problem, Tree

MD5 = hashlib.md5(b"x").hexdigest()
REG, EXE, LNK = stat.S_IFREG | 0o644, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def test_every_entry_field_survives_the_compact_tree():
    files = {
        "a.txt": Entry("a.txt", "git", REG, 3, "a" * 40),
        "bin/run": Entry("bin/run", "git", EXE, None, "b" * 40),
        "link": Entry("link", "git", LNK, 5, "c" * 40, target="a.txt"),
        "big.psd": Entry("big.psd", "lfs", REG, 9, "d" * 64),
        "data/x.bin": Entry("data/x.bin", "dvc", EXE, None, _md5("x"), True, "s3", "data", "sub", None, "v1"),
        "data/y.bin": Entry("data/y.bin", "dvc", REG, 7, _md5("y"), False, None, "data", "sub"),
        "odd": Entry("odd", "dvc", REG, 1, "ABCDEF" * 5 + "00", output="odd"),
        "gone.csv": Entry("gone.csv", "broken", REG, 0, "", output="gone.csv"),
    }
    tree = Tree(files, ["empty/inner"], [Problem("gone.csv", "gone.csv.dvc", "no")])
    assert dict(tree.files.items()) == files
    assert tree.dirs[""] == ["a.txt", "big.psd", "bin", "data", "empty", "gone.csv", "link", "odd"]
    assert tree.dirs["empty"] == ["inner"] and tree.dirs["empty/inner"] == []
    assert tree.problem_at("gone.csv").cause == "no" and tree.broken["gone.csv"].source == "gone.csv.dvc"
    assert len(tree.files) == 8 and "data/x.bin" in tree.files and "data" not in tree.files
    tree.set_size("bin/run", 11)
    assert tree.get("bin/run") == Entry("bin/run", "git", EXE, 11, "b" * 40)


def test_outputs_replace_git_and_clashes_become_problems():
    git = [GitEntry("data/old.txt", 0o100644, "a" * 40, "blob", 1), GitEntry("data/keep/k", 0o100644, "b" * 40,
                                                                              "blob", 1),
           GitEntry("README", 0o100755, "c" * 40, "blob", 2), GitEntry("lnk", 0o120000, "d" * 40, "blob", 6),
           GitEntry("vendor", 0o160000, "e" * 40, "commit", 0)]
    outs = [DvcOut("data/keep", _md5("m1"), True, None, None, False, None, "keep.dvc"),
            DvcOut("README/x", MD5, False, None, 1, False, None, "x.dvc"),        # under a git file
            DvcOut("clash", _md5("m2"), True, None, None, False, None, "clash.dvc"),
            DvcOut("empty", _md5("m3"), True, None, None, False, None, "empty.dvc")]
    manifests = {_md5("m1"): parse_manifest(json.dumps([{"md5": MD5, "relpath": "n/f.bin", "isexec": True},
                                                        {"md5": MD5, "relpath": "g"}]).encode(), "m1"),
                 _md5("m2"): [ManifestEntry("a", MD5, 1), ManifestEntry("a/b", MD5, 1)],
                 _md5("m3"): parse_manifest(b"[]", "m3")}
    tree = compose_tree(git, outs, manifests, symlinks={"lnk": "README"})
    assert list(tree.files) == ["README", "data/keep/g", "data/keep/n/f.bin", "data/old.txt", "lnk"]
    assert tree.files["data/keep/n/f.bin"].mode == EXE and tree.files["data/keep/g"].output == "data/keep"
    assert tree.files["README"].mode == EXE and tree.files["lnk"].target == "README"
    assert tree.dirs["vendor"] == [] and tree.dirs["empty"] == [] and tree.dirs["clash"] == []
    causes = sorted(p.cause for p in tree.problems)
    assert len(causes) == 2 and "lies under 'README'" in causes[1] and "'a' is a file" in causes[0]
    assert tree.problem_at("clash/a") is not None and tree.problem_at("data/keep/g") is None


def test_a_folder_emptied_by_an_output_vanishes_unless_kept():
    git = [GitEntry("d/e/f", 0o100644, "a" * 40, "blob", 1)]
    out = DvcOut("d/e", MD5, False, None, 1, False, None, "e.dvc")
    tree = compose_tree(git, [out], {})
    assert list(tree.files) == ["d/e"] and tree.files["d/e"].kind == "dvc" and "d/e" not in tree.dirs
    tree = compose_tree(git, [], {}, [Problem("d/e", "e.dvc", "gone", is_dir=True)])
    assert list(tree.files) == [] and tree.dirs["d/e"] == []


def test_outputs_inside_a_manifest_folder_and_unsorted_manifests():
    """A manifest folder kept as the manifest's own sorted lists still takes a later output
    inside it, refuses one under its files, and an unsorted manifest lays out the same."""
    rows = [{"md5": _md5(n), "relpath": n} for n in ["a.bin", "b.bin", "sub/c.bin"]]
    for order in (rows, rows[::-1]):
        outs = [DvcOut("data", _md5("m"), True, None, None, False, None, "data.dvc"),
                DvcOut("data/new/x", MD5, False, None, 1, False, None, "x.dvc"),
                DvcOut("data/a.bin/y", MD5, False, None, 1, False, None, "y.dvc"),
                DvcOut("data/b.bin", MD5, False, None, 2, False, None, "b.dvc")]
        tree = compose_tree([], outs, {_md5("m"): parse_manifest(json.dumps(order).encode(), "m")})
        assert list(tree.files) == ["data/a.bin", "data/b.bin", "data/new/x", "data/sub/c.bin"]
        assert tree.dirs["data"] == ["a.bin", "b.bin", "new", "sub"]
        assert tree.files["data/b.bin"].output == "data/b.bin" and tree.files["data/a.bin"].oid == _md5("a.bin")
        assert [p.cause for p in tree.problems] == ["y.dvc: output 'data/a.bin/y' lies under 'data/a.bin', which "
                                                    "is a file; dvc checkout cannot place it"]
    dup = [{"md5": MD5, "relpath": "a"}, {"md5": MD5, "relpath": "a/b"}, {"md5": MD5, "relpath": "c"},
           {"md5": MD5, "relpath": "c"}]
    for bad, needle in ((dup[:2], "'a' is a file"), (dup[2:], "names a file twice")):
        out = DvcOut("d", _md5("bad"), True, None, None, False, None, "d.dvc")
        tree = compose_tree([], [out], {_md5("bad"): parse_manifest(json.dumps(bad).encode(), "m")})
        assert list(tree.files) == [] and tree.dirs["d"] == [] and needle in tree.problems[0].cause


def test_walk_files_is_in_full_path_order():
    names = ["b/x", "b.txt", "b-c", "a", "b/a/z", "c"]
    tree = Tree({n: Entry(n, "git", REG, 1, "a" * 40) for n in names})
    assert [e.path for e in tree.walk_files()] == sorted(names)
    assert [e.path for e in tree.walk_files("b")] == ["b/a/z", "b/x"]


def test_manifest_is_parsed_in_bounded_memory():
    """50,000 entries with unique names: parsing peaks well below what json.loads of the
    same bytes holds (a dict and three objects per entry), and entries read back unchanged."""
    n = 50_000
    items = [{"md5": _md5(str(i)), "relpath": f"d{i // 1000:03d}/img_{i:07d}.png", "size": i} for i in range(n)]
    data = json.dumps(items).encode()
    tracemalloc.start()
    manifest = parse_manifest(data, "m")
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    loaded = json.loads(data)
    loads_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del loaded
    assert peak < loads_peak / 2 and held / n < 160, (held / n, peak / n, loads_peak / n)
    assert len(manifest) == n and manifest[12345] == ManifestEntry(items[12345]["relpath"], items[12345]["md5"], 12345)
    assert [e.relpath for e in manifest][:2] == ["d000/img_0000000.png", "d000/img_0000001.png"]


@pytest.mark.parametrize("data,needle", [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b"[] []", "trailing garbage"),
    (b'[{"md5": "' + MD5.encode() + b'\\n", "relpath": "a"}]', "is not an md5 hash"),
    (b'[{"md5": "' + MD5.encode() + b'", "relpath": "a/../../b"}]', "points outside"),
    (b'[{"md5": "' + MD5.encode() + b'", "relpath": "x/.git/config"}]', ".git"),
])
def test_hostile_manifests_fail_fast_with_one_line(data, needle):
    started = time.monotonic()
    with pytest.raises(DvcFileError) as err:
        parse_manifest(data, "d.dvc: manifest")
    assert needle in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("d.dvc: manifest")
    assert time.monotonic() - started < 10


def test_fetcher_keeps_a_bounded_number_of_sizes_in_memory(tmp_path):
    """Issue 11 item 3: the fetcher's in-memory sizes are bounded (the persistent index keeps
    them all): an evicted size is still known, and a verified correction of one still
    reaches the size observers (whoever showed the old size follows)."""
    from sidecar.fetch.scheduler import SIZE_MEMO, Fetcher, ObjectRef
    from sidecar.store import Store

    store = Store(tmp_path / "cache", 1 << 30, 1 << 20)
    try:
        fetcher = Fetcher(store, jobs=2, retries=0, deadline=5)
        assert fetcher._sizes.limit == SIZE_MEMO <= 1 << 17
        fetcher._sizes.limit = 100
        oids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(250)]
        for i, oid in enumerate(oids):
            fetcher._learned_size(oid, i + 1)
        store._index_writer.submit(lambda: None).result()   # the queued index writes landed
        assert len(fetcher._sizes) == 100 and oids[0] not in fetcher._sizes
        ref = ObjectRef(oids[0], None, "p", False, None, "x")   # type: ignore[arg-type]
        assert fetcher.known_size(ref) is None                   # memory only: evicted
        assert asyncio.run(fetcher.indexed_size(ref)) == 1        # the index still has it
        fetcher._sizes.pop(oids[0])
        corrected: list[tuple[str, int]] = []
        fetcher.size_observers.append(lambda oid, size: corrected.append((oid, size)))
        fetcher._learned_size(oids[0], 7, verified=True)
        assert corrected == [(oids[0], 7)] and len(fetcher._sizes) == 100
    finally:
        store.close()


def test_a_dvc_file_or_manifest_saying_zero_bytes_for_a_non_empty_md5_is_not_believed():
    """Only the md5 of no bytes can be 0 bytes long: a `.dvc` file's `size: 0` or a manifest
    row's `"size": 0` for any other md5 leaves the size unknown (learned from the verified
    object, whose bytes `dvc pull` would give), where it used to make the file read as empty."""
    empty = hashlib.md5(b"").hexdigest()
    rows = [{"md5": MD5, "relpath": "a", "size": 0}, {"md5": empty, "relpath": "e", "size": 0},
            {"md5": MD5, "relpath": "b", "size": 1}]
    outs = [DvcOut("one.bin", MD5, False, 0, None, False, None, "one.bin.dvc"),
            DvcOut("empty.bin", empty, False, 0, None, False, None, "empty.bin.dvc"),
            DvcOut("d", _md5("rows"), True, None, None, False, None, "d.dvc")]
    tree = compose_tree([], outs, {_md5("rows"): parse_manifest(json.dumps(rows).encode(), "rows")})
    assert tree.files["one.bin"].size is None and tree.files["empty.bin"].size == 0
    assert tree.files["d/a"].size is None and tree.files["d/e"].size == 0 and tree.files["d/b"].size == 1
