"""`dda upload`: append files to a DVC-tracked directory without pulling it. Checked with real
DVC: a fresh `git clone` + `dvc pull` must give every file back, and `dvc status -c` must be
clean. Bytes sent are counted at the server."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mounting import DDA
from repos import DVC3_BIN, _env, dvc2_bin

REMOTE_KINDS = ("local", "http", "s3")


def cli_env(cache: Path, http_remote, s3_remote) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DDA_REPO"}
    env.update({"DDA_CACHE_DIR": str(cache),
                "DDA_REMOTE_HTTP_USER": http_remote.user, "DDA_REMOTE_HTTP_PASSWORD": http_remote.password,
                "DDA_REMOTE_S3_ACCESS_KEY_ID": s3_remote.access_key,
                "DDA_REMOTE_S3_SECRET_ACCESS_KEY": s3_remote.secret_key})
    return env


def make_files(folder: Path, n: int, seed: int, size: int = 3000) -> dict[str, bytes]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(n):
        data = rng.randbytes(rng.randint(size // 2, size))
        (folder / f"new_{seed}_{i:02d}.bin").write_bytes(data)
        made[f"new_{seed}_{i:02d}.bin"] = data
    return made


def upload(repo, kind, cache, http_remote, s3_remote, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DDA, "upload", repo.git_url, *args, "--rev", repo.branches[kind]],
                          capture_output=True, text=True, env=cli_env(cache, http_remote, s3_remote), timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dvc_checkout(repo, kind, dest: Path, http_remote, s3_remote, dvc: str = DVC3_BIN) -> tuple[Path, dict]:
    """A fresh `git clone` + `dvc pull` with real DVC, credentials in .dvc/config.local."""
    env = _env(dest.parent)
    subprocess.run(["git", "clone", "-q", "-b", repo.branches[kind], repo.git_url, str(dest)], check=True, env=env)

    def d(*args):
        return subprocess.run([dvc, *args], cwd=dest, env=env, capture_output=True, text=True)

    d("remote", "modify", "--local", "http", "auth", "basic")
    d("remote", "modify", "--local", "http", "user", http_remote.user)
    d("remote", "modify", "--local", "http", "password", http_remote.password)
    d("remote", "modify", "--local", "s3", "access_key_id", s3_remote.access_key)
    d("remote", "modify", "--local", "s3", "secret_access_key", s3_remote.secret_key)
    pull = d("pull", "-j", "16")
    assert pull.returncode == 0, pull.stdout + pull.stderr
    return dest, {"status_c": d("status", "-c"), "status": d("status")}


def files_under(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def git_tip(repo, branch) -> str:
    return subprocess.run(["git", "ls-remote", repo.git_url, f"refs/heads/{branch}"], capture_output=True, text=True,
                          check=True).stdout.split()[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", REMOTE_KINDS)
def test_ten_files_into_ten_thousand(big_repo, kind, tmp_path, http_remote, s3_remote):
    new = make_files(tmp_path / "batch", 10, seed={"local": 1, "http": 2, "s3": 3}[kind])
    server = {"http": http_remote, "s3": s3_remote}.get(kind)
    mark = server.mark() if server else None
    proc = upload(big_repo, kind, tmp_path / "cache", http_remote, s3_remote,
                  *[str(tmp_path / "batch" / n) for n in sorted(new)], "--to", "data/many/d09/s9", "-m", "add 10")
    assert "+10 file(s)" in proc.stdout
    if server:
        sent = [r for r in server.requests_since(mark) if r.method in ("PUT", "POST")]
        body = sum(len(d) for d in new.values())
        manifest_size = 10_010 * 76   # one JSON row per file (md5 + relpath)
        total_sent = sum(r.request_length for r in server.requests_since(mark))
        assert len(sent) == 11                       # 10 objects + 1 manifest
        assert total_sent < (body + manifest_size * 1.3) + 64 * 1024, total_sent   # no dataset download
        gets = [r for r in server.requests_since(mark) if r.method == "GET"]
        assert sum(r.bytes_sent for r in gets) < 2 * manifest_size   # the old manifest, nothing more
    dest, status = dvc_checkout(big_repo, kind, tmp_path / "checkout", http_remote, s3_remote)
    got = files_under(dest / "data/many")
    assert len(got) == 10_010
    for name, data in new.items():
        assert got[f"d09/s9/{name}"].read_bytes() == data
    expected = {rel: p for rel, p in big_repo.expected_files().items() if rel.startswith("data/many/")}
    for rel in random.Random(0).sample(sorted(expected), 200):
        assert (dest / rel).read_bytes() == expected[rel].read_bytes()
    assert status["status_c"].returncode == 0 and "Cache and remote" in status["status_c"].stdout \
        or "up to date" in status["status_c"].stdout, status["status_c"].stdout
    assert "modified" not in status["status"].stdout, status["status"].stdout
    info = yaml.safe_load((dest / "data/many.dvc").read_text())["outs"][0]
    assert info["nfiles"] == 10_010
    assert info["size"] == sum(p.stat().st_size for p in got.values())


@pytest.mark.parametrize("kind", REMOTE_KINDS)
def test_new_directory_gets_a_dvc_file_and_dvc_pull_accepts_it(any_repo, kind, tmp_path, http_remote, s3_remote):
    new = make_files(tmp_path / "batch" / "sub", 4, seed=11)
    (tmp_path / "batch" / "top.txt").write_bytes(b"line one\r\nline two\r\n")   # CRLF: DVC 2 hashes it as text
    target = f"data/uploaded-{kind}"
    upload(any_repo, kind, tmp_path / "cache", http_remote, s3_remote, str(tmp_path / "batch"), "--to", target)
    # DVC 2's venv has no S3 support (see tests/repos.py); DVC 3 reads DVC 2 outputs too.
    dvc = DVC3_BIN if any_repo.dvc_version == "3" or kind == "s3" else dvc2_bin()
    dest, status = dvc_checkout(any_repo, kind, tmp_path / "checkout", http_remote, s3_remote, dvc=dvc)
    assert (dest / target / "top.txt").read_bytes() == b"line one\r\nline two\r\n"
    for name, data in new.items():
        assert (dest / target / "sub" / name).read_bytes() == data
    dvcfile = yaml.safe_load((dest / f"{target}.dvc").read_text())["outs"][0]
    assert dvcfile["nfiles"] == 5 and ("hash" in dvcfile) == (any_repo.dvc_version == "3")
    assert f"/uploaded-{kind}" in (dest / "data/.gitignore").read_text()
    assert "modified" not in status["status"].stdout and "new" not in status["status"].stdout, status["status"].stdout


def test_refusals(dvc3_repo, tmp_path, http_remote, s3_remote):
    batch = tmp_path / "b"
    make_files(batch, 1, seed=5)
    proc = upload(dvc3_repo, "local", tmp_path / "cache", http_remote, s3_remote, str(batch), "--to", "out/features",
                  check=False)
    assert proc.returncode != 0 and "output of a pipeline stage" in proc.stderr and "dvc.lock" in proc.stderr
    proc = upload(dvc3_repo, "local", tmp_path / "cache", http_remote, s3_remote, str(batch), "--to", "src",
                  check=False)
    assert proc.returncode != 0 and "git-tracked" in proc.stderr
    # replacing an existing file needs --replace
    existing = sorted(p for p in dvc3_repo.expected_files() if p.startswith("data/images/cats/"))[0]
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / Path(existing).name).write_bytes(b"different content")
    proc = upload(dvc3_repo, "local", tmp_path / "cache", http_remote, s3_remote, str(clash), "--to",
                  "data/images/cats", check=False)
    assert proc.returncode != 0 and "--replace" in proc.stderr and "Traceback" not in proc.stderr
    tip = git_tip(dvc3_repo, dvc3_repo.branches["local"])
    proc = upload(dvc3_repo, "local", tmp_path / "cache", http_remote, s3_remote, str(clash), "--to",
                  "data/images/cats", "--replace")
    assert "1 replaced" in proc.stdout
    assert git_tip(dvc3_repo, dvc3_repo.branches["local"]) != tip
    proc = subprocess.run([DDA, "cat", dvc3_repo.git_url, existing, "--rev", dvc3_repo.branches["local"]],
                          capture_output=True, env=cli_env(tmp_path / "cache2", http_remote, s3_remote))
    assert proc.stdout == b"different content"


def test_concurrent_uploads_both_land(dvc3_repo, tmp_path, http_remote, s3_remote):
    kind = "http"
    batches = [make_files(tmp_path / f"b{i}", 3, seed=20 + i) for i in range(2)]
    env = cli_env(tmp_path / "cache", http_remote, s3_remote)
    procs = [subprocess.Popen([DDA, "upload", dvc3_repo.git_url, str(tmp_path / f"b{i}"), "--to",
                               "data/images/concurrent", "--rev", dvc3_repo.branches[kind], "-m", f"batch {i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "DDA_CACHE_DIR": str(tmp_path / f"cache{i}")}) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    log = subprocess.run(["git", "--git-dir", str(dvc3_repo.local_path), "log", "--format=%s",
                          dvc3_repo.branches[kind]], capture_output=True, text=True).stdout
    assert "batch 0" in log and "batch 1" in log
    listing = subprocess.run([DDA, "ls", dvc3_repo.git_url, "data/images/concurrent", "--rev",
                              dvc3_repo.branches[kind]], capture_output=True, text=True, env=env).stdout
    for batch in batches:
        for name in batch:
            assert name in listing


def test_killed_upload_leaves_branch_and_rerun_skips_uploaded(dvc3_repo, tmp_path, http_remote, s3_remote):
    kind = "http"
    batch = tmp_path / "many"
    make_files(batch, 40, seed=33, size=3_000_000)
    env = cli_env(tmp_path / "cache", http_remote, s3_remote)
    env["DDA_JOBS"] = "1"
    tip = git_tip(dvc3_repo, dvc3_repo.branches[kind])
    mark = http_remote.mark()
    proc = subprocess.Popen([DDA, "upload", dvc3_repo.git_url, str(batch), "--to", "data/images/killed", "--rev",
                             dvc3_repo.branches[kind]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # the raw log, without waiting for it to settle: we want to kill mid-flight
        if sum(1 for line in http_remote._lines()[mark:] if line.startswith("PUT|")) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    puts_before_kill = len([r for r in http_remote.requests_since(mark) if r.method == "PUT"])
    assert 3 <= puts_before_kill < 40
    assert git_tip(dvc3_repo, dvc3_repo.branches[kind]) == tip
    done = proc.returncode
    assert done == -signal.SIGKILL
    again = subprocess.run([DDA, "upload", dvc3_repo.git_url, str(batch), "--to", "data/images/killed", "--rev",
                            dvc3_repo.branches[kind]], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "+40 file(s)" in again.stdout and "already on the remote" in again.stdout
    assert git_tip(dvc3_repo, dvc3_repo.branches[kind]) != tip


def test_python_api(dvc3_repo, tmp_path, http_remote, s3_remote, monkeypatch):
    import sidecar

    make_files(tmp_path / "api", 2, seed=44)
    monkeypatch.setenv("DDA_CACHE_DIR", str(tmp_path / "cache"))
    result = sidecar.upload(dvc3_repo.git_url, [tmp_path / "api"], to="data/images/api",
                            revision=dvc3_repo.branches["local"], message="from python")
    assert result.files_added == 2 and result.branch == dvc3_repo.branches["local"]
    assert git_tip(dvc3_repo, result.branch) == result.commit
