"""Errors a user can act on: one line, what and where, no traceback, no bad bytes served.
Runs the real `dda` command against the sample repository (local git + local DVC remote)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.sample import make_sample_repo

DDA = str(Path(sys.executable).parent / "dda")


def dda(*args, cache, env=None, check=False):  # noqa: D401
    full_env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    full_env.update({"DDA_CACHE_DIR": str(cache), **(env or {})})
    proc = subprocess.run([DDA, *args], capture_output=True, env=full_env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def one_line_error(proc):
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dda: error: ")
    return lines[0]


@pytest.fixture()
def sample(tmp_path):
    repo, remote = make_sample_repo(tmp_path / "s")
    return repo, remote, tmp_path / "cache"


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_listing_and_reading_the_sample(sample):
    repo, remote, cache = sample
    out = dda("ls", str(repo), "data/images/cats", cache=cache, check=True).stdout.decode().splitlines()
    assert len(out) == 24 and all(line.startswith("dvc ") for line in out)
    labels = dda("cat", str(repo), "data/labels.csv", cache=cache, check=True).stdout
    assert labels.count(b"\n") == 48


def test_unknown_revision(sample):
    repo, _, cache = sample
    line = one_line_error(dda("ls", str(repo), "--rev", "no-such-branch", cache=cache))
    assert "no branch, tag or commit named 'no-such-branch'" in line


def test_wrong_url(sample, tmp_path):
    _, _, cache = sample
    line = one_line_error(dda("ls", str(tmp_path / "nowhere"), cache=cache))
    assert "nowhere" in line and "no such directory" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(dda("ls", str(tmp_path / "empty"), cache=cache))
    assert "no git repository" in line


def test_missing_path(sample):
    repo, _, cache = sample
    line = one_line_error(dda("cat", str(repo), "data/nope.bin", cache=cache))
    assert "data/nope.bin" in line and "not in revision" in line


def test_missing_remote_object_names_path_and_md5(sample):
    repo, remote, cache = sample
    dvcfile = yaml.safe_load((repo / "data/labels.csv.dvc").read_text())
    md5 = dvcfile["outs"][0]["md5"]
    (remote / "files/md5" / md5[:2] / md5[2:]).unlink()
    proc = dda("cat", str(repo), "data/labels.csv", cache=cache)
    line = one_line_error(proc)
    assert "data/labels.csv" in line and md5[2:] in line and "missing" in line
    assert proc.stdout == b""


def test_hash_mismatch_is_never_served(sample):
    repo, remote, cache = sample
    md5 = yaml.safe_load((repo / "data/labels.csv.dvc").read_text())["outs"][0]["md5"]
    obj = remote / "files/md5" / md5[:2] / md5[2:]
    obj.write_bytes(obj.read_bytes().replace(b"cat", b"dog"))
    proc = dda("cat", str(repo), "data/labels.csv", cache=cache)
    line = one_line_error(proc)
    assert "does not match its md5" in line and "data/labels.csv" in line
    assert proc.stdout == b""


def test_malformed_dvc_file_names_file(sample):
    repo, _, cache = sample
    (repo / "data/labels.csv.dvc").write_text("outs:\n- md5: 1234\n  path: labels.csv\n")
    git(repo, "commit", "-qam", "break it")
    line = one_line_error(dda("ls", str(repo), cache=cache))
    assert "data/labels.csv.dvc" in line and "is not an md5 hash" in line


def test_malformed_manifest_names_it(sample):
    repo, remote, cache = sample
    md5 = yaml.safe_load((repo / "data/images.dvc").read_text())["outs"][0]["md5"][:-4]
    garbage = b'{"not": "a list"}'
    new = hashlib.md5(garbage).hexdigest()
    target = remote / "files/md5" / new[:2] / (new[2:] + ".dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(garbage)
    (repo / "data/images.dvc").write_text((repo / "data/images.dvc").read_text().replace(md5, new))
    git(repo, "commit", "-qam", "bad manifest")
    line = one_line_error(dda("ls", str(repo), cache=cache))
    assert "data/images.dvc" in line and new in line and "must be a JSON list" in line


def test_remote_override_from_env(sample, tmp_path):
    """Storage moved: point the remote elsewhere without editing the repository."""
    repo, remote, cache = sample
    moved = tmp_path / "moved"
    remote.rename(moved)
    line = one_line_error(dda("cat", str(repo), "data/labels.csv", cache=cache))
    assert "does not exist" in line or "missing" in line
    proc = dda("cat", str(repo), "data/labels.csv", cache=cache, env={"DDA_REMOTE_STORAGE_URL": str(moved)})
    assert proc.returncode == 0 and proc.stdout.count(b"\n") == 48


def test_get_directory_and_file(sample, tmp_path):
    repo, remote, cache = sample
    out = tmp_path / "out"
    dda("get", str(repo), "data/images", "-o", str(out), cache=cache, check=True)
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(got) == 48 and got[0].startswith("cats/")
    listing = {}
    for line in dda("ls", str(repo), "data/images", "-R", "--json", cache=cache, check=True).stdout.splitlines():
        import json
        item = json.loads(line)
        listing[item["path"]] = item["size"]
    assert {f"data/images/{p}": (out / p).stat().st_size for p in got} == listing
    single = tmp_path / "labels.csv"
    dda("get", str(repo), "data/labels.csv", "-o", str(single), cache=cache, check=True)
    assert single.read_bytes() == dda("cat", str(repo), "data/labels.csv", cache=cache, check=True).stdout
    assert not list(tmp_path.rglob("*.dda-part"))


def test_env_vars_configure_everything(sample, tmp_path):
    repo, remote, cache = sample
    proc = dda("cat", "data/labels.csv", cache=cache, env={"DDA_REPO": str(repo), "DDA_REVISION": "v1"})
    assert proc.returncode == 0 and proc.stdout.count(b"\n") == 48


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_demo_mounts_and_reports(tmp_path):
    proc = subprocess.run([DDA, "demo", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cold:" in proc.stdout and "warm" in proc.stdout
    cold, warm = proc.stdout.split("warm")[0], proc.stdout.split("warm")[1]
    assert "49 DVC-tracked files read" in cold and "bytes fetched from the remote: 3." in cold
    assert "bytes fetched from the remote: 0.00 MB; cache hits 49, misses 0" in warm
    assert not os.path.ismount(tmp_path / "mnt")


def test_short_sha_of_an_ancestor_after_the_cache_saw_the_tip(sample):
    """`--rev` takes a short commit anywhere in history, also once the cache holds a shallow
    fetch of the branch tip (a fetch without depth keeps a shallow repository's boundary)."""
    repo, _, cache = sample
    git(repo, "tag", "older")
    (Path(repo) / "middle.txt").write_text("middle\n")
    git(repo, "add", "middle.txt")
    git(repo, "commit", "-qm", "middle")
    old = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    (Path(repo) / "later.txt").write_text("later\n")
    git(repo, "add", "later.txt")
    git(repo, "commit", "-qm", "later")
    assert "later.txt" in dda("ls", str(repo), cache=cache, check=True).stdout.decode()
    out = dda("ls", str(repo), "--rev", old[:9], cache=cache, check=True).stdout.decode()
    assert "later.txt" not in out and "middle.txt" in out


def test_a_size_beyond_64_bits_is_one_bad_output_not_a_traceback(sample):
    """Found by the breaker: `size: 99999999999999999999999999` in a .dvc file ended every
    command of the revision in an OverflowError traceback (the tree keeps sizes in an int64
    array). It is one unavailable output, named with its file; the rest lists."""
    repo, _, cache = sample
    (Path(repo) / "huge.dvc").write_text("outs:\n- md5: b1946ac92492d2347c6235b4d2611184\n"
                                         "  size: 99999999999999999999999999\n  hash: md5\n  path: huge.txt\n")
    git(repo, "add", "huge.dvc")
    git(repo, "commit", "-qm", "huge")
    proc = dda("ls", str(repo), cache=cache)
    err = proc.stderr.decode()
    assert proc.returncode == 3 and "Traceback" not in err, err
    assert [l for l in err.splitlines() if l.strip()] == [
        "dda: error: huge.txt: unavailable: huge.dvc: outs[0]: 'size' must be a non-negative integer below 2**63, "
        "got 99999999999999999999999999"]
    assert "data/" in proc.stdout.decode()
    cat = one_line_error(dda("cat", str(repo), "huge.txt", cache=cache))
    assert "huge.dvc" in cat and "Traceback" not in cat


def test_a_failure_keeps_its_exit_code_when_the_stderr_reader_left(sample):
    """Found by a fresh tester: `dda get URL . -o g 2>&1 | head -1` exited 0 where the same
    command exits 3 (the broken pipe on stderr was taken for `dda cat | head`). The reader of
    stderr leaving drops the message, never the exit code."""
    repo, _, cache = sample
    (Path(repo) / "bad.dvc").write_text("outs:\n- md5: b1946ac92492d2347c6235b4d2611184\n"
                                        "  size: -1\n  hash: md5\n  path: bad.txt\n")
    git(repo, "add", "bad.dvc")
    git(repo, "commit", "-qm", "bad")
    env = {**{k: v for k, v in os.environ.items() if k != "DDA_REPO"}, "DDA_CACHE_DIR": str(cache)}
    for args in (("ls", str(repo)), ("cat", str(repo), "bad.txt")):
        told = dda(*args, cache=cache)
        assert told.returncode != 0 and b"bad" in told.stderr
        read_end, write_end = os.pipe()
        os.close(read_end)                      # nobody reads stderr
        try:
            proc = subprocess.run([DDA, *args], stdout=subprocess.DEVNULL, stderr=write_end, env=env, timeout=120)
        finally:
            os.close(write_end)
        assert proc.returncode == told.returncode, (args, proc.returncode, told.returncode)
