"""One bad object never takes down a listing or a download (issue 11, item 2), and a size that
only a remote's answer gave (a HEAD, a published size index) never beats the verified object
for a reader nobody told the size (`dda cat`, `dda get`, a hooks read from the start).

The breaker3 reproductions (tests/test_breaker3.py) cover the 60-file folder cases; these add
the exit codes and output shapes, a large (multi-chunk) object whose HEAD lied either way, and
the hooks' read of a tampered size index.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dvclayout import write_layout
from faultremote import FaultRemote
from mounting import DDA
from servers import HttpRemoteServer
from test_integrity import repo  # noqa: F401 - the fault-remote repository fixture


def _manifest(layout) -> list[dict]:
    m = layout.manifest_md5
    return json.loads((layout.remote_root / "files/md5" / m[:2] / (m[2:] + ".dir")).read_bytes())


def _dda(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DDA, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def missing_one(tmp_path):
    """A 20-file folder on the fault remote, one object of it 404: (layout, victim, env)."""
    remote = FaultRemote(tmp_path / "remote").start()
    layout = write_layout(tmp_path / "l", folders=1, per_folder=20, remote=tmp_path / "remote",
                          remote_url=remote.url)
    victim = _manifest(layout)[3]
    remote.fault("status", method=None, path=f"files/md5/{victim['md5'][:2]}/{victim['md5'][2:]}",
                 times=None, status=404)
    yield layout, victim, {"DDA_CACHE_DIR": str(tmp_path / "cache"), "DDA_DEADLINE": "3"}
    remote.stop()


def test_ls_shows_an_unsized_file_with_a_dash_and_exits_3(missing_one):
    layout, victim, env = missing_one
    name = f"data/{victim['relpath']}"
    proc = _dda("ls", str(layout.repo), "data", env=env)
    assert proc.returncode == 3, proc.stderr
    rows = {line.split()[2]: line.split() for line in proc.stdout.splitlines()}
    assert len(rows) == 20 and rows[name][:2] == ["dvc", "-"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dda: error:")]
    assert len(errors) == 1 and name in errors[0] and "missing" in errors[0]
    listed = [json.loads(line) for line in _dda("ls", str(layout.repo), "data", "-R", "--json", env=env)
              .stdout.splitlines()]
    assert [r["size"] for r in listed if r["path"] == name] == [None]
    assert all(isinstance(r["size"], int) for r in listed if r["path"] != name) and len(listed) == 20
    one = _dda("ls", str(layout.repo), name, env=env)       # the file alone: its row, named, exit 3
    assert one.returncode == 3 and one.stdout.split() == ["dvc", "-", name] and name in one.stderr


def test_get_of_the_missing_file_alone_fails_and_writes_nothing(missing_one, tmp_path):
    layout, victim, env = missing_one
    out = tmp_path / "one.bin"
    proc = _dda("get", str(layout.repo), f"data/{victim['relpath']}", "-o", str(out), env=env)
    assert proc.returncode == 1 and "missing" in proc.stderr and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1


def test_get_names_the_missing_file_once_and_says_the_others_were_written(missing_one, tmp_path):
    layout, victim, env = missing_one
    dest = tmp_path / "dest"
    proc = _dda("get", str(layout.repo), "data", "-o", str(dest), env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and f"data/{victim['relpath']}" in lines[0] and "1 of 20 files not written" in lines[1]
    assert len([p for p in dest.rglob("*") if p.is_file()]) == 19 and not (dest / victim["relpath"]).exists()


def test_get_of_a_wrong_object_leaves_no_temporary_file(tmp_path):
    """An object whose bytes are wrong (same length) fails while it is being written: its
    temporary file (a random `.XXXX.dda-part` beside it) is removed, the others land."""
    remote = FaultRemote(tmp_path / "remote").start()
    try:
        layout = write_layout(tmp_path / "l", folders=1, per_folder=6, remote=tmp_path / "remote",
                              remote_url=remote.url)
        victim = _manifest(layout)[2]
        remote.fault("wrong", path=f"files/md5/{victim['md5'][:2]}/{victim['md5'][2:]}", times=None)
        dest = tmp_path / "dest"
        proc = _dda("get", str(layout.repo), "data", "-o", str(dest), env={"DDA_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        remote.stop()
    assert proc.returncode == 1 and f"data/{victim['relpath']}" in proc.stderr, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(e["relpath"] for e in _manifest(layout)
                                                              if e != victim)


@pytest.mark.parametrize("name,lie", [("data/mid.bin", 100), ("data/a.bin", 200_000), ("data/a.bin", 1000)])
def test_cat_and_get_of_an_object_whose_head_lied(repo, tmp_path, name, lie):  # noqa: F811
    """data/mid.bin (3 MiB + 5, three 1 MiB chunks), data/a.bin (160,687 B, one chunk): its
    HEAD says `lie` bytes, and `dda ls` put that in the index. `dda cat` and `dda get` told
    nobody that size: they write the whole verified object (a shorter lie must not cut it, a
    longer one must not pad it). (A lie that makes a one-chunk object look like several
    chunks fails the first streamed read instead - never a wrong byte - see README.)"""
    cache = tmp_path / "cache"
    env = {"DDA_CHUNK_SIZE": "1M"}
    repo.server.fault("lie_length", method="HEAD", path=repo.object_path(name), times=None, value=lie)
    assert repo.dda("ls", "data", cache=cache, env=env).returncode == 0
    cat = repo.dda("cat", name, cache=cache, env=env)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == repo.content[name]
    fresh = tmp_path / "fresh"
    assert repo.dda("ls", "data", cache=fresh, env=env).returncode == 0     # the lie again, a cold cache
    out = tmp_path / "out.bin"
    got = repo.dda("get", name, "-o", str(out), cache=fresh, env=env)
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == repo.content[name]


@pytest.fixture
def tampered(tmp_path):
    """A published size index with one wrong size: (layout, victim, true size, env)."""
    srv = HttpRemoteServer(tmp_path / "nginx").start()
    layout = write_layout(tmp_path / "l", folders=1, per_folder=1000, remote=srv.root, remote_url=srv.url)
    env = {"DDA_REMOTE_STORAGE_USER": srv.user, "DDA_REMOTE_STORAGE_PASSWORD": srv.password,
           "DDA_REMOTE_STORAGE_METHOD": "PUT"}
    assert _dda("sizes", "publish", str(layout.repo), "data",
                env={**env, "DDA_CACHE_DIR": str(tmp_path / "pub")}).returncode == 0
    key = next(srv.root.glob("files/md5/*/*.dir.sizes"))
    doc = json.loads(key.read_bytes())
    victim = _manifest(layout)[7]
    true = doc["sizes"][victim["md5"]]
    doc["sizes"][victim["md5"]] = 100 if true != 100 else 101
    key.write_text(json.dumps(doc))
    yield layout, victim, true, env
    srv.stop()


_HOOKS_READ = textwrap.dedent("""
    import hashlib, json, sys
    from sidecar.hooks import install_hooks
    install_hooks(sys.argv[1], root=sys.argv[2], cache_dir=sys.argv[3])
    path = sys.argv[2] + "/" + sys.argv[4]
    out = {"md5": hashlib.md5(open(path, "rb").read()).hexdigest()}
    with open(path, "rb") as f:           # told the size first (a seek to the end): then it must hold
        out["told"] = f.seek(0, 2)
        f.seek(0)
        try:
            out["read"] = len(f.read())
        except OSError as err:
            out["read"] = err.errno
    out["after"] = len(open(path, "rb").read())   # the next open has the true size
    print(json.dumps(out))
""")


def test_hooks_read_of_a_tampered_size_index_returns_the_true_bytes(tampered, tmp_path):
    """install_hooks(): a plain open().read() of the file whose published size is wrong returns
    the verified bytes. A reader that was told the wrong size (seek to the end) on a fresh
    client gets EIO rather than a file cut short; the next open sees the true size."""
    import errno

    layout, victim, true, env = tampered
    proc = subprocess.run([sys.executable, "-c", _HOOKS_READ, str(layout.repo), str(tmp_path / "view"),
                           str(tmp_path / "fresh"), f"data/{victim['relpath']}"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["md5"] == victim["md5"]
    # the first read already corrected the size: the second open is told the truth
    assert out["told"] == true and out["read"] == true and out["after"] == true
    told = subprocess.run([sys.executable, "-c", _HOOKS_READ.replace(
        'out = {"md5": hashlib.md5(open(path, "rb").read()).hexdigest()}', 'out = {}'),
        str(layout.repo), str(tmp_path / "view"), str(tmp_path / "cold"), f"data/{victim['relpath']}"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert told.returncode == 0, told.stderr
    out = json.loads(told.stdout)
    assert out["told"] != true and out["read"] == errno.EIO and out["after"] == true


def test_get_of_a_tampered_size_index_writes_the_true_bytes(tampered, tmp_path):
    layout, victim, true, env = tampered
    dest = tmp_path / "dest"
    proc = _dda("get", str(layout.repo), "data", "-o", str(dest), env={**env, "DDA_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr
    got = (dest / victim["relpath"]).read_bytes()
    assert len(got) == true and hashlib.md5(got).hexdigest() == victim["md5"]


def test_mount_over_a_tampered_size_index_fails_only_the_reader_told_the_wrong_size(tampered, tmp_path, mp):
    """The mount's kernel is given the published (wrong) size before any byte is read: that
    reader gets the right bytes or EIO, never a file cut or padded to the wrong size; the read
    corrects it, and the next stat and open see the true size and bytes (README, item 6)."""
    from mounting import wait_until

    layout, victim, true, env = tampered
    env = {**env, "DDA_CACHE_DIR": str(tmp_path / "m")}
    mounted = _dda("mount", str(layout.repo), str(mp), "--daemon", env=env)
    assert mounted.returncode == 0, mounted.stderr
    target = mp / "data" / victim["relpath"]
    try:
        assert os.stat(target).st_size != true           # the index's size, as published
        try:
            assert hashlib.md5(target.read_bytes()).hexdigest() == victim["md5"]
        except OSError:
            pass
        assert wait_until(lambda: os.stat(target).st_size == true)
        assert hashlib.md5(target.read_bytes()).hexdigest() == victim["md5"]
    finally:
        _dda("unmount", str(mp), env=env)
