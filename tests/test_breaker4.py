"""Listing, sizes and odd names as a new user meets them (breaker4): the mount, `dda ls` and
`dda get` against the reference, a `git clone` + `dvc pull` of the same revision of a repository
authored with real DVC 3 (`dvc add` + `dvc push` to a local remote).

Each test here is a failure found that way, kept as a strict xfail: it turns red (XPASS) the
day the behaviour is fixed, and then loses its marker. Behaviour only, no timings.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mounting import DDA
from repos import DVC3_BIN, _env, _run

LONG = "L" * 255                      # the longest name ext4 (and FUSE) takes
LATIN1 = b"caf\xe9.txt"               # not UTF-8: git takes it, DVC 3 refuses it in a tracked dir


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A DVC 3 repository with odd names: `data/` (dvc add: a 255-byte name, a subfolder, names
    with spaces and dashes) and `gitdir/` in git (a symlink, an executable, a non-UTF-8 name, a
    255-byte name); the reference is `git clone` + `dvc pull` of it. (repo, reference)."""
    top = tmp_path_factory.mktemp("odd")
    env = _env(top)
    work, remote, ref = top / "work", top / "remote", top / "ref"
    work.mkdir()
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run([DVC3_BIN, "init", "-q"], work, env)
    _run([DVC3_BIN, "remote", "add", "-d", "storage", str(remote)], work, env)
    data, gitdir = work / "data", work / "gitdir"
    (data / "sub").mkdir(parents=True)
    gitdir.mkdir()
    for i, name in enumerate([LONG, "with space.txt", "-dash", "plain.txt"]):
        (data / name).write_bytes(b"dvc %d\n" % i * (i + 1))
    (data / "sub" / "inner.txt").write_bytes(b"inner\n")
    for i, name in enumerate([LONG.encode(), LATIN1, b"plain.txt"]):
        (gitdir / os.fsdecode(name)).write_bytes(b"git %d\n" % i * (i + 3))
    (gitdir / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (gitdir / "run.sh").chmod(0o755)
    (gitdir / "link").symlink_to("run.sh")
    (gitdir / "sub").mkdir()
    (gitdir / "sub" / "x.txt").write_text("x\n")
    _run([DVC3_BIN, "add", "-q", "data"], work, env)
    _run([DVC3_BIN, "push", "-q"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "odd names"], work, env)
    _run(["git", "clone", "-q", str(work), str(ref)], top, env)
    _run([DVC3_BIN, "pull", "-q"], ref, env)
    return work, ref


@pytest.fixture(scope="module")
def odd_mount(odd, tmp_path_factory):
    """`dda mount --daemon` of the odd repository: (mountpoint, reference)."""
    repo, ref = odd
    top = tmp_path_factory.mktemp("oddmnt")
    mp = top / "mnt"
    mp.mkdir()
    env = {**os.environ, "DDA_CACHE_DIR": str(top / "cache")}
    proc = subprocess.run([DDA, "mount", str(repo), str(mp), "--daemon"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    yield mp, ref
    subprocess.run([DDA, "unmount", str(mp)], env=env, capture_output=True, timeout=30)
    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def _dda(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DDA, *args], env={**os.environ, "DDA_CACHE_DIR": str(cache)},
                          capture_output=True, timeout=timeout)


def test_mount_symlink_mode_is_that_of_a_checkout(odd_mount):
    """`ls -l` of a committed symlink: `lrwxrwxrwx` in a checkout, `l---------` in the mount."""
    mp, ref = odd_mount
    want, got = os.lstat(ref / "gitdir/link"), os.lstat(mp / "gitdir/link")
    assert stat.S_ISLNK(got.st_mode)
    assert stat.S_IMODE(got.st_mode) == stat.S_IMODE(want.st_mode) == 0o777


def test_mount_readdir_has_dot_and_dotdot(odd_mount):
    """`ls -a` of any folder in a checkout has `.` and `..`; in the mount they were
    missing (the root and every folder), so `ls -a` and tools counting entries differ."""
    mp, ref = odd_mount
    for sub in ("", "data", "gitdir/sub"):
        want = subprocess.run(["ls", "-a", str(ref / sub)], capture_output=True, text=True, check=True).stdout.split("\n")
        got = subprocess.run(["ls", "-a", str(mp / sub)], capture_output=True, text=True, check=True).stdout.split("\n")
        # ls sorts `.` and `..` with the rest (C.UTF-8: `-dash` comes before `.`), so compare
        # whole listings; the root differs by what a checkout has and a mount hides (.git)
        assert "." in got and ".." in got, sub
        if sub:
            assert got == want, sub


def test_mount_directory_link_count_counts_subfolders(odd_mount):
    """`stat -c %h`: a checkout's folder has 2 + its number of subfolders (the `..` of each);
    the mount says 2 for every folder, which tools using the leaf optimisation (`find`
    without -noleaf on file systems it trusts, `ls -l` readers) take as 'no subfolders'."""
    mp, ref = odd_mount
    for sub in ("", "data", "gitdir"):
        hidden = 1 if sub == "" else 0        # the checkout's .git, a folder the mount never shows
        assert os.stat(mp / sub).st_nlink == os.stat(ref / sub).st_nlink - hidden, sub


def test_get_folder_with_a_255_byte_name(odd, tmp_path):
    """`dda get URL data -o DEST`: every file lands, the one with a 255-byte name too (a name
    `dvc pull` checks out). Today: a traceback (OSError ENAMETOOLONG on `.NAME.dda-part`) and
    exit 1, that file missing, for DVC-tracked and git files alike."""
    repo, ref = odd
    for sub in ("data", "gitdir"):
        dest = tmp_path / f"got-{sub}"
        proc = _dda("get", str(repo), sub, "-o", str(dest), cache=tmp_path / "cache")
        assert b"Traceback" not in proc.stderr
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-500:]
        assert (dest / LONG).read_bytes() == (ref / sub / LONG).read_bytes()


def test_ls_json_is_valid_utf8_for_a_non_utf8_name(odd, tmp_path):
    """`dda ls URL gitdir --json | jq`: a name that is not UTF-8 (git allows any bytes) is
    printed raw inside the JSON string, so the line is not UTF-8 and `jq`/`json.loads` of the
    decoded text fail. Every line should parse, and the name come back distinct."""
    repo, _ = odd
    proc = _dda("ls", str(repo), "gitdir", "--json", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line.decode("utf-8")) for line in proc.stdout.splitlines()]
    paths = {os.fsencode(r["path"]) for r in rows}
    assert b"gitdir/" + LATIN1 in paths


def test_remote_that_refuses_head_serves_like_dvc_pull(tmp_path, mp):
    """Some HTTP fronts (signed-URL proxies, minimal servers) answer HEAD with 405 and serve
    GET. `dvc pull` checks such a repository out (its HTTP file system falls back to GET);
    dda answers 'unexpected HTTP 405' to `dda cat` (which needs no size first) and EIO to
    every `stat` in the mount. The size can come from the verified GET (Content-Range)."""
    import hashlib

    from dvclayout import write_layout
    from faultremote import FaultRemote

    remote = FaultRemote(tmp_path / "remote").start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=3, remote=tmp_path / "remote",
                              remote_url=remote.url)
        remote.fault("status", method="HEAD", times=None, status=405)
        env = _env(tmp_path)
        _run(["git", "clone", "-q", str(layout.repo), str(tmp_path / "ref")], tmp_path, env)
        _run([DVC3_BIN, "pull", "-q"], tmp_path / "ref", env)                 # the reference works
        want = (tmp_path / "ref/data/f000001.bin").read_bytes()
        proc = _dda("cat", str(layout.repo), "data/f000001.bin", cache=tmp_path / "c1")
        assert proc.returncode == 0 and proc.stdout == want, proc.stderr
        cenv = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "c2"), "DDA_DEADLINE": "5"}
        up = subprocess.run([DDA, "mount", str(layout.repo), str(mp), "--daemon"], env=cenv, capture_output=True,
                            text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        try:
            got = (mp / "data/f000001.bin").read_bytes()
        finally:
            subprocess.run([DDA, "unmount", str(mp)], env=cenv, capture_output=True, timeout=30)
        assert hashlib.md5(got).hexdigest() == hashlib.md5(want).hexdigest()
    finally:
        remote.stop()


def _read_twice(path: Path) -> list[bytes | OSError]:
    """Two opens of `path`, each read to the end (what `cp`, then a retry, does)."""
    out: list[bytes | OSError] = []
    for _ in range(2):
        try:
            out.append(path.read_bytes())
        except OSError as exc:
            out.append(exc)
    return out


def test_mount_head_claiming_zero_bytes_never_serves_an_empty_file(tmp_path, mp):
    """The remote's HEAD says 0 bytes for a 495-byte object (its GET is right). README: a
    size learned from a remote is never the truth; a reader given a wrong size gets EIO, not
    a file cut short, and the next open sees the true size. With 0 the kernel never asks for
    a byte, so `cat`/`cp` succeed with an empty file on every open, and `find -printf %s`
    keeps saying 0. (Only d41d8cd98f00b204e9800998ecf8427e, the md5 of no bytes, can be 0.)"""
    import hashlib
    import json

    from dvclayout import write_layout
    from faultremote import FaultRemote

    remote = FaultRemote(tmp_path / "remote").start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=10, remote=tmp_path / "remote",
                              remote_url=remote.url)
        m = layout.manifest_md5
        victim = json.loads((layout.remote_root / "files/md5" / m[:2] / (m[2:] + ".dir")).read_bytes())[5]
        md5 = victim["md5"]
        remote.fault("lie_length", method="HEAD", path=f"files/md5/{md5[:2]}/{md5[2:]}", times=None, value=0)
        cenv = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache"), "DDA_DEADLINE": "5"}
        up = subprocess.run([DDA, "mount", str(layout.repo), str(mp), "--daemon"], env=cenv, capture_output=True,
                            text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        try:
            reads = _read_twice(mp / "data" / victim["relpath"])
        finally:
            subprocess.run([DDA, "unmount", str(mp)], env=cenv, capture_output=True, timeout=30)
    finally:
        remote.stop()
    assert not any(isinstance(r, bytes) and hashlib.md5(r).hexdigest() != md5 for r in reads), \
        [len(r) if isinstance(r, bytes) else r for r in reads]
    assert isinstance(reads[1], bytes) and hashlib.md5(reads[1]).hexdigest() == md5


def test_mount_size_index_claiming_zero_bytes_never_serves_an_empty_file(tmp_path, mp):
    """`dda sizes publish`, then one size in `<manifest>.dir.sizes` reads 0 (a buggy or hostile
    publisher; keys still exactly the manifest's md5s). README: a size that a download
    contradicts is dropped and the read succeeds; the first mount reader may get EIO. With 0
    there is no download: every open of that file in a fresh client's mount reads 0 bytes
    and succeeds."""
    import hashlib
    import json

    from dvclayout import write_layout
    from servers import HttpRemoteServer

    srv = HttpRemoteServer(tmp_path / "nginx").start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=1000, remote=srv.root, remote_url=srv.url)
        env = {**os.environ, "DDA_REMOTE_STORAGE_USER": srv.user, "DDA_REMOTE_STORAGE_PASSWORD": srv.password,
               "DDA_REMOTE_STORAGE_METHOD": "PUT"}
        pub = subprocess.run([DDA, "sizes", "publish", str(layout.repo), "data"],
                             env={**env, "DDA_CACHE_DIR": str(tmp_path / "pub")}, capture_output=True, text=True,
                             timeout=120)
        assert pub.returncode == 0, pub.stderr
        key = next(srv.root.glob("files/md5/*/*.dir.sizes"))
        doc = json.loads(key.read_bytes())
        m = layout.manifest_md5
        victim = json.loads((srv.root / "files/md5" / m[:2] / (m[2:] + ".dir")).read_bytes())[7]
        doc["sizes"][victim["md5"]] = 0
        key.write_text(json.dumps(doc))
        cenv = {**env, "DDA_CACHE_DIR": str(tmp_path / "fresh"), "DDA_DEADLINE": "5"}
        up = subprocess.run([DDA, "mount", str(layout.repo), str(mp), "--daemon"], env=cenv, capture_output=True,
                            text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        try:
            reads = _read_twice(mp / "data" / victim["relpath"])
        finally:
            subprocess.run([DDA, "unmount", str(mp)], env=cenv, capture_output=True, timeout=30)
    finally:
        srv.stop()
    assert not any(isinstance(r, bytes) and hashlib.md5(r).hexdigest() != victim["md5"] for r in reads), \
        [len(r) if isinstance(r, bytes) else r for r in reads]
    assert isinstance(reads[1], bytes) and hashlib.md5(reads[1]).hexdigest() == victim["md5"]


@pytest.fixture
def head_says_zero(tmp_path):
    """10 files on the fault-injecting HTTP remote whose HEAD says 0 bytes for one of them
    (its GET is right): (layout, victim manifest entry)."""
    import json

    from dvclayout import write_layout
    from faultremote import FaultRemote

    remote = FaultRemote(tmp_path / "remote").start()
    layout = write_layout(tmp_path / "l", folders=1, per_folder=10, remote=tmp_path / "remote", remote_url=remote.url)
    m = layout.manifest_md5
    victim = json.loads((layout.remote_root / "files/md5" / m[:2] / (m[2:] + ".dir")).read_bytes())[5]
    md5 = victim["md5"]
    remote.fault("lie_length", method="HEAD", path=f"files/md5/{md5[:2]}/{md5[2:]}", times=None, value=0)
    yield layout, victim
    remote.stop()


def test_get_writes_true_bytes_when_a_head_claims_zero_bytes(head_says_zero, tmp_path):
    """`dda get URL data -o DEST`: README, a reader nobody told the size (`dda get`) gets the
    whole verified object. With a HEAD of Content-Length: 0 the file lands empty and the
    command exits 0: a wrong file on disk, unverified, no error."""
    import hashlib

    layout, victim = head_says_zero
    dest = tmp_path / "dest"
    proc = _dda("get", str(layout.repo), "data", "-o", str(dest), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert hashlib.md5((dest / victim["relpath"]).read_bytes()).hexdigest() == victim["md5"]


def test_hooks_read_true_bytes_when_a_head_claims_zero_bytes(head_says_zero, tmp_path):
    """A hooks `open(p, 'rb').read()` (README: gets the whole verified object, a reader nobody
    told the size). With a HEAD of Content-Length: 0 it returns b'' without error."""
    import sys

    layout, victim = head_says_zero
    clone = tmp_path / "clone"
    clone.mkdir()
    code = (f"import hashlib\nfrom sidecar import install_hooks\n"
            f"install_hooks({str(layout.repo)!r}, root={str(clone)!r}, cache_dir={str(tmp_path / 'cache')!r})\n"
            f"print(hashlib.md5(open({str(clone / 'data' / victim['relpath'])!r}, 'rb').read()).hexdigest())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip() == victim["md5"]


def test_object_truncated_to_zero_bytes_on_the_remote_is_never_served_as_empty(tmp_path, mp):
    """A local remote where one object file is 0 bytes (a copy cut short by a full disk). The
    guarantee: content that disagrees with the recorded md5 is never returned without a
    failure. Today `dda cat` prints nothing and exits 0, `dda get` writes an empty file and
    exits 0, and the mount reads it as empty, every time: a 0-byte answer is never hashed
    (the md5 of no bytes is d41d8cd98f00b204e9800998ecf8427e, not the recorded one)."""
    import hashlib
    import json

    from dvclayout import write_layout

    layout = write_layout(tmp_path / "l", folders=1, per_folder=10)
    m = layout.manifest_md5
    victim = json.loads((layout.remote_root / "files/md5" / m[:2] / (m[2:] + ".dir")).read_bytes())[5]
    (layout.remote_root / "files/md5" / victim["md5"][:2] / victim["md5"][2:]).write_bytes(b"")
    path = f"data/{victim['relpath']}"

    def wrong(ok: bool, data: bytes) -> bool:
        return ok and hashlib.md5(data).hexdigest() != victim["md5"]

    cat = _dda("cat", str(layout.repo), path, cache=tmp_path / "c1")
    got = _dda("get", str(layout.repo), "data", "-o", str(tmp_path / "dest"), cache=tmp_path / "c2")
    written = tmp_path / "dest" / victim["relpath"]
    cenv = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "c3")}
    up = subprocess.run([DDA, "mount", str(layout.repo), str(mp), "--daemon"], env=cenv, capture_output=True,
                        text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    try:
        reads = _read_twice(mp / path)
    finally:
        subprocess.run([DDA, "unmount", str(mp)], env=cenv, capture_output=True, timeout=30)
    assert not wrong(cat.returncode == 0, cat.stdout), "dda cat exit 0 with wrong content"
    assert not wrong(got.returncode == 0 and written.exists(), written.read_bytes() if written.exists() else b""), \
        "dda get exit 0 with a wrong file"
    assert not any(isinstance(r, bytes) and hashlib.md5(r).hexdigest() != victim["md5"] for r in reads), \
        "mount read succeeded with wrong content"


@pytest.mark.parametrize("status", [503, 429])
def test_one_transient_503_on_a_head_is_retried(tmp_path, mp, status):
    """README: retries with exponential backoff on 5xx (`--retries`, default 5). One 503 on a
    GET is retried and nobody notices; one 503 on the HEAD that sizes a file is not: `dda cat`
    exits 1, `dda ls` prints `-` and exits 3, `dda get` skips the file, and `stat` in a mount
    (so `find -printf %s`, `ls -l`) gets EIO. A burst of 20 503s under load fails 18 of a
    1,000-file folder's stats within 2 s, with a 60 s deadline. The same with a 429 and
    `Retry-After: 1`, which a GET honours."""
    from dvclayout import write_layout
    from faultremote import FaultRemote

    remote = FaultRemote(tmp_path / "remote").start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=5, remote=tmp_path / "remote",
                              remote_url=remote.url)
        remote.fault("status", method="HEAD", times=1, status=status, retry_after=1)
        cat = _dda("cat", str(layout.repo), "data/f000000.bin", cache=tmp_path / "c1")
        remote.fault("status", method="HEAD", times=1, status=status, retry_after=1)
        cenv = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "c2")}
        up = subprocess.run([DDA, "mount", str(layout.repo), str(mp), "--daemon"], env=cenv, capture_output=True,
                            text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        try:
            found = subprocess.run(["find", "data", "-type", "f", "-printf", "%s %p\n"], cwd=mp, capture_output=True,
                                   text=True, timeout=60)
        finally:
            subprocess.run([DDA, "unmount", str(mp)], env=cenv, capture_output=True, timeout=30)
    finally:
        remote.stop()
    assert cat.returncode == 0 and len(cat.stdout) > 0, cat.stderr
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 5, found.stderr


def test_get_folder_with_a_file_named_like_its_temp_file(tmp_path):
    """`dda get` writes each file through a temporary `.NAME.dda-part` beside it. A repository
    that holds both `a` and `.a.dda-part` (a leftover someone committed, or a hostile
    repository) gets `a` with the other file's bytes and no `.a.dda-part`, exit 0: wrong
    bytes on disk, no error (git files and DVC-tracked files alike). A `git clone` has both."""
    env = _env(tmp_path)
    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    for n in "abcdefghijklmnopqrstuvwxyz":
        (work / "d" / n).write_text(f"real {n}\n")
        (work / "d" / f".{n}.dda-part").write_text(f"other {n}\n")
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "names"], work, env)
    dest = tmp_path / "dest"
    proc = _dda("get", str(work), "d", "-o", str(dest), cache=tmp_path / "cache")
    got = {p.name: p.read_text() for p in dest.iterdir()} if dest.is_dir() else {}
    want = {p.name: p.read_text() for p in (work / "d").iterdir()}
    assert got == want, proc.stderr


def test_get_folder_onto_an_existing_file_is_one_clear_line(odd, tmp_path):
    """`dda get URL data -o DEST` where DEST is already a regular file: a one-line error naming
    DEST (as `cp -r dir file` says 'cannot overwrite non-directory'), the file untouched.
    Today: a Python traceback ending in FileExistsError from os.makedirs."""
    repo, _ = odd
    dest = tmp_path / "afile"
    dest.write_text("mine\n")
    proc = _dda("get", str(repo), "data", "-o", str(dest), cache=tmp_path / "cache")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(dest) in err, err
    assert dest.read_text() == "mine\n"


@pytest.mark.parametrize("cmd", [["ls", "data"], ["cat", "data/plain.txt"]])
def test_full_stdout_is_one_clear_line(odd, tmp_path, cmd):
    """`dda ls URL data > file-on-a-full-disk` (here /dev/full): like `ls` ('write error: No
    space left on device'), one line and a non-zero exit; today a Python traceback ending
    in OSError [Errno 28]."""
    repo, _ = odd
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([DDA, cmd[0], str(repo), *cmd[1:]], stdout=full, stderr=subprocess.PIPE,
                              env={**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache")}, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
